"""The external judge against a stub chat-completions server started here (127.0.0.1, a free port).

The stub reads what to do from the prompt, "<behaviour>|<reply>":
    ok       answers <reply>                        429      429 (Retry-After: 0) once, then answers
    500x2    500 twice, then answers                 500      500 always
    400      400 with a JSON error body              slow     sleeps 0.5 s, then answers
    notjson  200 with a non-JSON body                nochoices 200 with JSON lacking "choices"
    delay<ms> sleeps <ms> milliseconds, then answers
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emojax.digest import digest
from emojax.errors import InputError
from emojax.experiment.judge import Judge, JudgeRecord, JudgeSettings, parse_score, retry_after


class Stub:
    def __init__(self):
        self.requests = []  # (path, headers, body) of every request, in arrival order
        self.seen = Counter()  # requests per prompt
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def calls(self, prompt: str | None = None) -> int:
        return len(self.requests) if prompt is None else self.seen[prompt]


def _handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            with stub.lock:
                stub.requests.append((self.path, dict(self.headers), body))
                stub.seen[prompt] += 1
                n = stub.seen[prompt]
                stub.in_flight += 1
                stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
            try:
                self._answer(prompt, n)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def _answer(self, prompt: str, n: int):
            behaviour, _, reply = prompt.partition("|")
            if self.path != "/v1/chat/completions":
                return self._send(404, b"no such path")
            if behaviour == "429" and n == 1:
                return self._send(429, b"slow down", {"Retry-After": "0"})
            if (behaviour == "500x2" and n <= 2) or behaviour == "500":
                return self._send(500, b"internal error")
            if behaviour == "400":
                return self._send(400, json.dumps({"error": {"message": "model 'nope' does not exist"}}).encode())
            if behaviour == "notjson":
                return self._send(200, b"<html>gateway</html>")
            if behaviour == "nochoices":
                return self._send(200, json.dumps({"object": "chat.completion"}).encode())
            if behaviour == "slow":
                time.sleep(0.5)
            if behaviour.startswith("delay"):
                time.sleep(int(behaviour[5:]) / 1000)
            answer = {"object": "chat.completion",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}
            self._send(200, json.dumps(answer).encode())

        def _send(self, status: int, data: bytes, headers: dict | None = None):
            with stub.lock:  # no longer in flight once answering starts: the client may send its next request
                stub.in_flight -= 1
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def stub(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def _judge(stub, cache_dir=None, **settings) -> Judge:
    settings = {"backoff_s": 0.01, "timeout_s": 5.0, **settings}
    return Judge(JudgeSettings(url=stub.url, model="stub-judge", **settings), cache_dir)


def test_a_good_answer_is_scored_from_one_request_with_the_documented_body(stub):
    [record] = _judge(stub).score(["ok|Score: 7/10, because ..."], scale=10)
    assert record == JudgeRecord(score=7.0, raw="Score: 7/10, because ...", error=None,
                                 request_hash=record.request_hash, cached=False, attempts=1)
    [(path, headers, body)] = stub.requests
    assert path == "/v1/chat/completions"
    assert body == {"model": "stub-judge", "messages": [{"role": "user", "content": "ok|Score: 7/10, because ..."}],
                    "temperature": 0, "max_tokens": 16}
    assert "authorization" not in {k.lower() for k in headers}
    assert record.request_hash == digest({"url": stub.url, **body})
    assert json.loads(json.dumps(record.to_json())) == {
        "score": 7.0, "raw": "Score: 7/10, because ...", "error": None, "request_hash": record.request_hash,
        "cached": False, "attempts": 1}


def test_429_and_500_are_retried_and_the_attempts_counted(stub):
    # backoff_s is large: the 429 finishing fast shows its Retry-After (0) was honoured over the backoff.
    start = time.monotonic()
    [after_429] = _judge(stub, backoff_s=30.0).score(["429|4"], scale=10)
    assert time.monotonic() - start < 5
    [after_500s] = _judge(stub).score(["500x2|6"], scale=10)
    assert (after_429.score, after_429.error, after_429.attempts) == (4.0, None, 2)
    assert (after_500s.score, after_500s.error, after_500s.attempts) == (6.0, None, 3)
    assert stub.calls("429|4") == 2 and stub.calls("500x2|6") == 3


def test_retries_give_up_after_the_configured_attempts_and_record_the_last_error(stub):
    [record] = _judge(stub, retries=2).score(["500|1"], scale=10)
    assert record.score is None and record.raw is None and record.attempts == 3
    assert record.error == "HTTP 500: internal error"
    assert stub.calls("500|1") == 3


def test_a_400_is_not_retried_and_its_status_and_body_are_recorded(stub):
    [record] = _judge(stub).score(["400|x"], scale=10)
    assert record.score is None and record.attempts == 1 and stub.calls("400|x") == 1
    assert record.error.startswith("HTTP 400: ") and "model 'nope' does not exist" in record.error


def test_garbage_out_of_range_and_malformed_replies_are_recorded_errors(stub):
    garbage, high, negative, not_json, no_choices, fine = _judge(stub).score(
        ["ok|I cannot rate this.", "ok|12", "ok|-1", "notjson|", "nochoices|", "ok|10"], scale=10)
    assert garbage.score is None and garbage.raw == "I cannot rate this."
    assert garbage.error.startswith("unparseable reply") and "I cannot rate this." in garbage.error
    assert high.score is None and high.raw == "12" and high.error.startswith("out of range: 12 ")
    assert negative.score is None and negative.error.startswith("out of range: -1 ")
    assert not_json.score is None and not_json.error.startswith("malformed response: not JSON")
    assert "<html>gateway</html>" in not_json.error
    assert no_choices.score is None and no_choices.error.startswith("malformed response: no choices")
    assert fine.score == 10.0 and fine.error is None  # the top of the scale is in range
    assert all(r.attempts == 1 for r in (garbage, high, negative, not_json, no_choices, fine))


def test_a_reply_slower_than_the_timeout_is_retried_then_recorded(stub):
    [record] = _judge(stub, timeout_s=0.1, retries=1).score(["slow|5"], scale=10)
    assert record.score is None and record.attempts == 2 and stub.calls("slow|5") == 2
    assert record.error.startswith("timed out after 0.1 s")


def test_an_unreachable_server_is_a_recorded_connection_failure():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = Judge(JudgeSettings(url=f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff_s=0.01), None)
    [record] = judge.score(["ok|1"], scale=10)
    assert record.score is None and record.attempts == 2 and record.error.startswith("connection failed")


def test_the_cache_answers_a_second_run_without_http_and_never_keeps_a_failure(stub, tmp_path):
    prompts = ["ok|3", "ok|8.5", "400|x"]
    first = _judge(stub, tmp_path).score(prompts, scale=10)
    assert [r.score for r in first] == [3.0, 8.5, None] and not any(r.cached for r in first)
    calls = stub.calls()

    second = _judge(stub, tmp_path).score(prompts, scale=10)
    assert [r.score for r in second] == [3.0, 8.5, None]
    assert [r.cached for r in second] == [True, True, False]
    assert [r.attempts for r in second] == [0, 0, 1]
    assert [r.request_hash for r in second] == [r.request_hash for r in first]
    assert stub.calls() == calls + 1 and stub.calls("400|x") == 2  # only the failure was asked again

    files = sorted(p.name for p in tmp_path.rglob("*.json"))
    assert files == sorted(f"{r.request_hash}.json" for r in first[:2])
    assert (tmp_path / first[0].request_hash[:2] / f"{first[0].request_hash}.json").is_file()

    successes_only = _judge(stub, tmp_path).score(prompts[:2], scale=10)
    assert stub.calls() == calls + 1 and all(r.cached for r in successes_only)  # zero HTTP calls


def test_a_corrupt_cache_file_is_a_miss_and_is_rewritten(stub, tmp_path):
    [first] = _judge(stub, tmp_path).score(["ok|2"], scale=10)
    path = tmp_path / first.request_hash[:2] / f"{first.request_hash}.json"
    path.write_text('{"request_hash": "trunc')
    [again] = _judge(stub, tmp_path).score(["ok|2"], scale=10)
    assert (again.score, again.cached, again.attempts) == (2.0, False, 1) and stub.calls("ok|2") == 2
    assert json.loads(path.read_text())["raw"] == "2"
    [cached] = _judge(stub, tmp_path).score(["ok|2"], scale=10)
    assert cached.cached and stub.calls("ok|2") == 2


def test_the_key_comes_from_the_named_env_var_and_stays_out_of_the_hash(stub, monkeypatch):
    monkeypatch.setenv("EMOJAX_TEST_JUDGE_KEY", "sekrit-123")
    [keyed] = _judge(stub, api_key_env="EMOJAX_TEST_JUDGE_KEY").score(["ok|1"], scale=10)
    [plain] = _judge(stub).score(["ok|1"], scale=10)
    (_, keyed_headers, _), (_, plain_headers, _) = stub.requests
    assert keyed_headers["Authorization"] == "Bearer sekrit-123"
    assert "Authorization" not in plain_headers
    assert keyed.request_hash == plain.request_hash


def test_the_request_hash_follows_url_model_max_tokens_and_prompt(stub):
    def hash_of(prompt="ok|1", url=stub.url, model="stub-judge", max_tokens=16, scale=10):
        judge = Judge(JudgeSettings(url=url, model=model, max_tokens=max_tokens), None)
        return judge.score([prompt], scale=scale)[0].request_hash

    base = hash_of()
    assert hash_of(scale=100) == base  # the scale is not sent
    assert hash_of(url=stub.url + "/") == base  # a trailing slash names the same endpoint
    others = {hash_of(model="other-judge"), hash_of(max_tokens=4), hash_of(prompt="ok|2")}
    assert len(others) == 3 and base not in others


def test_results_keep_the_prompts_order_under_concurrency(stub):
    # Earlier prompts answer later, so completion order is the reverse of prompt order.
    n = 16
    prompts = [f"delay{(n - i) * 15}|{i}" for i in range(n)]
    records = _judge(stub, concurrency=8).score(prompts, scale=n, progress=True)
    assert [r.score for r in records] == [float(i) for i in range(n)]
    assert stub.max_in_flight > 1 and stub.max_in_flight <= 8


def test_identical_prompts_share_one_request(stub):
    records = _judge(stub).score(["ok|5", "ok|6", "ok|5"], scale=10)
    assert [r.score for r in records] == [5.0, 6.0, 5.0] and stub.calls("ok|5") == 1
    assert records[0] == records[2]


def test_construction_rejects_a_bad_url_an_unset_key_and_bad_settings(monkeypatch):
    for url in ("ftp://host/v1", "127.0.0.1:8000/v1", "http:///v1", ""):
        with pytest.raises(InputError, match="judge url"):
            Judge(JudgeSettings(url=url, model="m"), None)
    monkeypatch.delenv("EMOJAX_TEST_UNSET_KEY", raising=False)
    with pytest.raises(InputError, match="EMOJAX_TEST_UNSET_KEY"):
        Judge(JudgeSettings(url="http://127.0.0.1:1/v1", model="m", api_key_env="EMOJAX_TEST_UNSET_KEY"), None)
    with pytest.raises(InputError) as bad:
        Judge(JudgeSettings(url="http://127.0.0.1:1/v1", model="m", concurrency=0, retries=-1), None)
    assert "retries -1" in str(bad.value) and "concurrency 0" in str(bad.value)
    judge = Judge(JudgeSettings(url="http://127.0.0.1:1/v1", model="m"), None)
    with pytest.raises(InputError, match="judge scale"):
        judge.score(["x"], scale=0)
    assert judge.score([], scale=10) == []


def test_parse_score_and_retry_after():
    assert parse_score("7", 10) == (7.0, None)
    assert parse_score("  Rating: 3.5 out of 5", 5) == (3.5, None)
    assert parse_score("none", 10)[0] is None
    assert retry_after(None, 0.25) == 0.25 and retry_after("2", 0.25) == 2.0
    assert retry_after("1e9", 0.25) == 60.0 and retry_after("soon", 0.25) == 0.25
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 0.25) == 0.0  # a date in the past: retry now
