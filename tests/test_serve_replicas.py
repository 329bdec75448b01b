"""benchmarks/bench_serve_replicas.py: real `gill serve` processes started, answering over HTTP, and always stopped."""

import importlib

import psutil
import pytest


def load():
    return importlib.import_module("benchmarks.bench_serve_replicas")


def children_of_this_process() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def test_two_replicas_answer_over_http_as_one_and_leave_no_process(tmp_path):
    bench = load()
    output = tmp_path / "serve.md"
    output.write_text("# engine results\n\n## Throughput and latency\n\nkept as it is\n")
    before = children_of_this_process()
    results = bench.main(["--model", "tiny-random", "--kinds", "text", "--clients", "2", "--requests-per-client", "2",
                          "--rounds", "1", "--output", str(output)])
    assert len(results["pids"]) == 2 and len(set(results["pids"])) == 2
    assert not any(bench.process_alive(pid) for pid in results["pids"])
    assert children_of_this_process() <= before
    rows = results["rows"]
    assert [(r["clients"], r["replicas"], r["requests"], r["errors"]) for r in rows] == [(2, 1, 4, 0), (2, 2, 4, 0)]
    assert rows[1]["batch"] > 0  # both replicas' engines ran calls
    assert results["checked"] == 4 and results["mismatched"] == []  # two replicas answer as one does
    text = output.read_text()
    assert "kept as it is" in text and text.count("## Several replicas over HTTP") == 1 and "4 of 4 identical" in text


def test_interrupted_start_stops_every_server(monkeypatch):
    """A Ctrl+C while the servers start (KeyboardInterrupt): each one is stopped and waited for."""
    bench = load()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.Replicas, "wait_healthy", interrupted)
    replicas = bench.Replicas(2, "tiny-random", stop_timeout=5)
    with pytest.raises(KeyboardInterrupt):
        with replicas:
            pytest.fail("never reached")
    assert len(replicas.pids) == 2
    assert all(p.returncode is not None for p in replicas.processes)
    assert not any(bench.process_alive(pid) for pid in replicas.pids)


def test_a_server_that_cannot_start_is_reported_with_its_log_and_the_others_stopped():
    bench = load()
    replicas = bench.Replicas(2, "no-such-model-folder", stop_timeout=5, start_timeout=120)
    with pytest.raises(RuntimeError, match=r"(?s)replica \d .* ended while starting.*no-such-model-folder"):
        with replicas:
            pass
    assert not any(bench.process_alive(pid) for pid in replicas.pids)


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "1"], ["--replicas", "at least 2", "1"]),
    (["--clients", "0"], ["--clients", "0"]),
    (["--clients", "16,x"], ["--clients", "16,x"]),
    (["--kinds", "text,video"], ["--kinds", "video"]),
])
def test_bad_arguments_are_refused_before_any_server_starts(argv, words, capsys, monkeypatch):
    bench = load()
    monkeypatch.setattr(bench.Replicas, "start", lambda self: pytest.fail("no server may start"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_results_section_is_replaced_in_place_and_kept_by_bench_serve():
    from benchmarks.bench_serve import REPLICAS_HEADING, replace_section, section

    text = f"# title\n\n## A\n\na\n\n{REPLICAS_HEADING}\n\nold\n\n## B\n\nb\n"
    new = replace_section(text, REPLICAS_HEADING, [REPLICAS_HEADING, "", "new"])
    assert new == f"# title\n\n## A\n\na\n\n{REPLICAS_HEADING}\n\nnew\n\n## B\n\nb\n"
    assert section(new, REPLICAS_HEADING) == [REPLICAS_HEADING, "", "new", ""]
    assert replace_section("# title\n", REPLICAS_HEADING, [REPLICAS_HEADING]) == f"# title\n\n{REPLICAS_HEADING}\n"
