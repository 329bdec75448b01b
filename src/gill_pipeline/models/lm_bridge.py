"""Where GILL's learned `[IMG]` rows meet the frozen causal LM: written once, used by inference and training.

- `embed_tokens`: token ids (`[IMG]` ids included) -> the LM's input embeddings. `[IMG]` positions take
  `GILLModel.img_input_embeddings`, kept in the space of the LM's embedding MATRIX rows and put through the LM
  embedding module's own scale, as text is (Gemma, XGLM, BioGPT and MiniCPM3 multiply their lookups by
  `embed_scale`). Initialising the rows from the matrix's statistics and rescaling them to the matrix's row norms
  during training therefore stays consistent with what the LM reads.
  `token_embedder` is the same for a decoding loop: the table's placement looked up once, not once per token.
- `lm_forward_with_img_logits`: one LM forward whose logits cover the LM vocabulary extended with the `[IMG]` ids.
  The `[IMG]` logits are appended as extra columns of the LM head's own output, so whatever the LM does to its
  logits after the head (Gemma's final soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`, a cast to
  float) is done to the `[IMG]` logits too, without a list of families.
- The last hidden state (what GILL reads at `[IMG]` positions) is taken from the LM's base model (`get_decoder()`)
  by a forward hook, so the LM is not asked for every layer's hidden states at every step. The first forward of each
  LM also asks for them once and keeps the hook only if its tensor EQUALS `hidden_states[-1]`; LMs where it does
  not (or that have no separate base model) keep asking for all layers, so the numbers never change.
- `new_cache`: the cache transformers' `generate()` would start from.
- `takes_position_ids`: whether the LM can be told each row's positions (needed to left-pad a batch).
- `position_offset`: where the LM's own position numbering starts (RoBERTa-style decoders count from
  `padding_idx + 1`); `lm_forward_with_img_logits` adds it to the 0-based position ids GILL passes.
"""

import contextlib
import inspect
import weakref

import torch
from diffusers.utils import logging

from .placement import compute_device, disk_group_holding, onloaded

logger = logging.get_logger(__name__)


def _unwrapped(module):
    """The embedding module itself when an adapter (peft) wraps it."""
    return getattr(module, "base_layer", module)


def input_embedding_scale(llm) -> float | torch.Tensor:
    """The factor the LM's input embedding module multiplies its looked-up rows by (1 for most LMs).

    transformers' scaled embedding modules (`GemmaTextScaledWordEmbedding`, `XGLMScaledWordEmbedding`,
    `BioGptScaledWordEmbedding`, `MiniCPM3...`) all keep it as `embed_scale`.
    """
    scale = getattr(_unwrapped(llm.get_input_embeddings()), "embed_scale", None)
    return 1.0 if scale is None else scale


def embed_tokens(llm, gill, img_token_ids, ids: torch.Tensor) -> torch.Tensor:
    """Token ids `(...)` -> LM input embeddings `(..., D)` on `ids.device`; the LM's matrix is only read.

    `[IMG]` positions get `gill.img_input_embeddings` times the embedding module's scale. Negative ids (placeholders
    that the caller overwrites, e.g. visual-prefix slots) and ids past the LM's vocabulary (the `[IMG]` ids) are
    looked up as id 0 first, so the LM never indexes out of range.
    """
    return token_embedder(llm, gill, img_token_ids)(ids)


def token_embedder(llm, gill, img_token_ids):
    """`embed_tokens` for many calls in a row (a decoding loop): where the embedding table computes and which
    offload group holds it are looked up once (walking the LM's modules costs about a millisecond per token), so
    offload hooks must not be added or removed between its calls. Gives the same tensors as `embed_tokens`."""
    table = llm.get_input_embeddings()
    vocab = _unwrapped(table).weight.shape[0]
    # Looked up where the table computes: its own offload hook's or group's device (fixed while offloading is), else
    # where its weight is at each call (model offload moves the whole LM between calls and within one: the weight is
    # on the CPU before the first LM pass of an answer and on the accelerator after it); `meta` is no place for ids.
    weight_owner = _unwrapped(table)
    hook_device = compute_device(weight_owner, weights=False)
    group = disk_group_holding(llm, weight_owner)
    img_ids = list(img_token_ids)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        img = torch.as_tensor(img_ids, device=ids.device, dtype=ids.dtype)
        matches = ids[..., None] == img
        is_img = matches.any(-1)
        safe_ids = torch.where(is_img | (ids < 0) | (ids >= vocab), torch.zeros_like(ids), ids)
        with onloaded(group):
            weight = weight_owner.weight
            lookup_device = hook_device or (weight.device if weight.device.type != "meta" else ids.device)
            embeds = table(safe_ids.to(lookup_device)).to(ids.device)
        if not is_img.any():
            return embeds
        scale = input_embedding_scale(llm)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=ids.device, dtype=embeds.dtype)
        rows = gill.img_input_embeddings.to(device=ids.device, dtype=embeds.dtype) * scale
        return torch.where(is_img[..., None], rows[matches.long().argmax(-1)], embeds)

    return embed


@contextlib.contextmanager
def _img_logits_from_lm_head(llm, gill, found: dict):
    """Appends the `[IMG]` logits of the head's input to the LM head's output while the LM runs."""
    head = llm.get_output_embeddings()
    if head is None:
        yield
        return

    def append_img_logits(module, inputs, output):
        rows = gill.img_output_rows.to(device=output.device)
        img = (inputs[0].to(device=output.device, dtype=rows.dtype) @ rows.t()).to(output.dtype)
        found["width"], found["img_logits"] = output.shape[-1], img
        return torch.cat([output, img], dim=-1)

    handle = head.register_forward_hook(append_img_logits)
    try:
        yield
    finally:
        handle.remove()


_POSITION_OFFSETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Where each LM's last hidden state is read: from its base model's output (checked equal once), or from all layers.
_BASE_MODEL, _ALL_LAYERS = "base_model", "all_layers"
_HIDDEN_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _last_hidden_module(llm):
    """The LM's base model (the module whose output's `last_hidden_state` the LM head reads), or None."""
    model = _base_model(llm)
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError):
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


@contextlib.contextmanager
def _last_hidden_from(module, found: dict):
    """Keeps `module`'s output `last_hidden_state` (or first tensor) in `found["hidden"]` while the LM runs."""
    if module is None:
        yield
        return

    def keep_last_hidden(module, inputs, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            hidden = output[0]
        found["hidden"] = hidden

    handle = module.register_forward_hook(keep_last_hidden)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def position_offset(llm) -> int:
    """The first position id the LM numbers a sequence with when left to itself: 0, or `padding_idx + 1` for
    RoBERTa-style decoders (RoBERTa, CamemBERT, XLM-R, data2vec-text, ...), whose learned position table starts
    there. Found once per LM: only an embedding module with a `padding_idx` and a position table is a candidate, and the
    candidate is kept only if a short forward with it equals the LM's own numbering."""
    if llm in _POSITION_OFFSETS:
        return _POSITION_OFFSETS[llm]
    offset = 0
    causal_lm = _base_model(llm)
    embeddings = getattr(getattr(causal_lm, "base_model", causal_lm), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(padding_idx, int) and hasattr(embeddings, "position_embeddings") and takes_position_ids(llm):
        table = _unwrapped(llm.get_input_embeddings())
        device = compute_device(table) or torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(1, 3, table.weight.shape[1], generator=generator).to(device=device, dtype=table.weight.dtype)
        own = llm(inputs_embeds=probe, use_cache=False).logits
        positions = torch.arange(3, device=device)[None] + padding_idx + 1
        shifted = llm(inputs_embeds=probe, position_ids=positions, use_cache=False).logits
        if torch.allclose(own, shifted, atol=1e-5, rtol=1e-4):
            offset = padding_idx + 1
    _POSITION_OFFSETS[llm] = offset
    return offset


def lm_forward_with_img_logits(llm, gill, img_token_ids, inputs_embeds: torch.Tensor, **lm_kwargs):
    """Runs the LM on `inputs_embeds` -> (logits over the LM vocabulary plus the `[IMG]` ids, last hidden state,
    the LM's output).

    Columns of ids past the LM's vocabulary that are not `[IMG]` ids are `-inf`; the `[IMG]` columns always come from
    `gill`, whatever the LM had there. `lm_kwargs` go to the LM (`attention_mask`, `cache`, `logits_to_keep`, ...).
    """
    img_token_ids = list(img_token_ids)
    if lm_kwargs.get("position_ids") is not None:
        offset = position_offset(llm)
        if offset:
            lm_kwargs["position_ids"] = lm_kwargs["position_ids"] + offset
    found = {}
    source = _HIDDEN_SOURCES.get(llm)  # None: not checked yet
    base = _last_hidden_module(llm) if source != _ALL_LAYERS else None
    ask_all = source != _BASE_MODEL or base is None
    with _img_logits_from_lm_head(llm, gill, found), _last_hidden_from(base, found):
        output = llm(inputs_embeds=inputs_embeds, output_hidden_states=ask_all, return_dict=True, **lm_kwargs)
    if source is None:
        captured = found.get("hidden")
        reference = output.hidden_states[-1]
        same = captured is not None and captured.shape == reference.shape and torch.equal(captured, reference)
        _HIDDEN_SOURCES[llm] = _BASE_MODEL if same else _ALL_LAYERS
        if not same:
            logger.info(f"{type(llm).__name__}: the last hidden state is read from all layers' hidden states.")
    if ask_all:
        hidden = output.hidden_states[-1]
    else:
        hidden = found.get("hidden")
        if hidden is None:
            raise RuntimeError(
                f"{type(llm).__name__}: its base model was not run in this forward, so GILL has no last hidden state."
            )
    logits = output.logits
    r = len(img_token_ids)
    if found and logits.shape[-1] == found["width"] + r:
        lm_logits, img_logits = logits[..., :-r], logits[..., -r:]
    elif found:
        # The LM cut its logits after the head (e.g. Inkling drops padded vocabulary columns): the `[IMG]` logits of
        # the head's own input, without whatever else the LM did after the head.
        lm_logits, img_logits = logits, found["img_logits"].to(device=logits.device, dtype=logits.dtype)
    else:
        # The head was not called as a module: the raw `[IMG]` logits of the last hidden state.
        logger.warning_once(
            f"{type(llm).__name__}: could not read the `[IMG]` logits through the LM head; using `hidden @ rows.T`."
        )
        lm_logits = logits
        kept = hidden[..., -logits.shape[-2] :, :]
        img_logits = gill.img_logits(kept).to(device=logits.device, dtype=logits.dtype)
    vocab = max(lm_logits.shape[-1], max(img_token_ids) + 1)
    if vocab > lm_logits.shape[-1]:
        filler = lm_logits.new_full((*lm_logits.shape[:-1], vocab - lm_logits.shape[-1]), float("-inf"))
        lm_logits = torch.cat([lm_logits, filler], dim=-1)
    ids = torch.as_tensor(img_token_ids, device=lm_logits.device)
    return lm_logits.index_copy(-1, ids, img_logits), hidden, output


def base_model_gives_last_hidden(llm) -> bool:
    """Whether GILL reads this LM's last hidden state from its base model's output (checked equal to
    `hidden_states[-1]` by its first `lm_forward_with_img_logits`), so the base model alone may be swapped for a
    compiled version of itself (`pipeline/compiled_decoding.py`)."""
    return _HIDDEN_SOURCES.get(llm) == _BASE_MODEL


def _base_model(llm):
    get_base_model = getattr(llm, "get_base_model", None)  # peft
    return get_base_model() if callable(get_base_model) else llm


def new_cache(llm):
    """The cache `generate()` starts from: a `DynamicCache` for the LM's text config, or `None` for LMs that bring
    their own cache class (MiniMax, Mamba, ...), which then build it in their first forward with `use_cache=True`."""
    from transformers import DynamicCache

    model = _base_model(llm)
    supports_default = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports_default is not None and not supports_default():
        return None
    config = model.config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return DynamicCache(config=config)


def takes_position_ids(llm) -> bool:
    """Whether the LM's forward accepts `position_ids`.

    LMs that do not derive positions themselves: some from the attention mask (ALiBi in BLOOM and MPT, state-space
    models that need none), others from the cache length (TrOCR), where a left-padded row would start at the wrong
    position. Not knowing which, the decoder runs such LMs one row at a time.
    """
    return "position_ids" in inspect.signature(_base_model(llm).forward).parameters
