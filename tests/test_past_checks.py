"""A `GILLPast` knows the LM, learned weights, dtype and device it was made with: reusing it after the pipeline was
cast or moved is refused by name before the LM runs, never a crash inside attention (issue 22, silent wrong results)."""

import pytest
import torch

from gill_pipeline import GILLPast
from tests.conftest import make_pipeline

CALL = dict(max_new_tokens=3, max_images=0)


@pytest.fixture
def own_pipe():
    """A pipeline of this test's own: the tests cast it."""
    return make_pipeline("opt")


def test_a_past_made_before_a_cast_is_refused_by_name(own_pipe, monkeypatch):
    past = own_pipe([{"role": "user", "content": "a red circle"}], **CALL).past
    assert past is not None
    own_pipe.to(torch.bfloat16)
    ran = []
    monkeypatch.setattr(own_pipe, "decode", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"`past` was made while the LM ran in torch.float32 on cpu, and it now runs "
                                         r"in torch.bfloat16 on cpu"):
        own_pipe([{"role": "user", "content": "a red circle"}], past=past, **CALL)
    assert ran == []  # refused before the LM runs


def test_the_same_past_continues_when_nothing_changed(own_pipe):
    message = [{"role": "user", "content": "a red circle"}]
    past = own_pipe(message, **CALL).past
    out = own_pipe(message, past=past, **CALL)
    assert out.past is not None and out.past.reused > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cache=object(), keys=None), "`GILLPast.keys` must be a list of position keys"),
        (dict(cache=object(), keys=["token"]), "`GILLPast.keys` must be a list of position keys"),
        (dict(cache=object(), owner="mine"), "`GILLPast.owner` must be a tuple"),
    ],
)
def test_a_hand_made_past_is_refused_by_name(kwargs, match):
    with pytest.raises(TypeError, match=match):
        GILLPast(**kwargs)


def test_a_past_without_cache_is_refused_by_name(own_pipe):
    with pytest.raises(ValueError, match=r"`past` holds no cache"):
        own_pipe([{"role": "user", "content": "a red circle"}], past=GILLPast(cache=None), **CALL)
