"""A local HTTP server imitating an OpenAI-compatible chat-completions endpoint, for the judge tests.

Each graded answer carries a marker `[[id=X mode=M score=N]]`; the server replies by mode:
ok (scores N, bare JSON), fenced (```json fence), 429 (first attempt: 429 with Retry-After: 1), 500 (first
attempt: 500), truncated (first attempt: a 200 body cut off mid-JSON), prose (always prose instead of JSON),
slow (0.4 s delay), timeout (first attempt: no reply for 1.5 s, counted in flight for the
client's 1.0 s timeout only). A request without `Bearer <key>` gets 401.
It records every request, the attempts per id and the most requests ever in flight at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_MARK = re.compile(r"\[\[id=(\S+) mode=(\S+) score=(\d+)\]\]")


class JudgeServer:
    def __init__(self, key: str):
        self.key = key
        self.requests = 0
        self.attempts = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, handler, status: int, body: bytes, headers=()):
        handler.send_response(status)
        for k, v in headers:
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def handle(self, handler):
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
            if handler.headers.get("Authorization") != f"Bearer {self.key}":
                time.sleep(0.05)
                return self._send(handler, 401, b'{"error": {"message": "invalid api key"}}')
            request = json.loads(body)
            with self._lock:
                self.bodies.append(request)
            text = request["messages"][-1]["content"][-1]["text"]
            item, mode, score = _MARK.search(text).groups()
            with self._lock:
                self.attempts[item] += 1
                first = self.attempts[item] == 1
            scores = {c: int(score) for c in ("logical_consistency", "image_grounding", "no_hallucination",
                                               "reflection")}
            content = json.dumps({**scores, "rationale": f"graded {item}"})
            if mode == "429" and first:
                return self._send(handler, 429, b'{"error": "rate limited"}', [("Retry-After", "1")])
            if mode == "500" and first:
                return self._send(handler, 500, b'{"error": "internal"}')
            if mode == "timeout" and first:
                # The client gives up after its 1.0 s timeout; stop counting this request as in flight just
                # before that, so the in-flight figure measures the client's open requests.
                time.sleep(0.95)
                with self._lock:
                    self.in_flight -= 1
                time.sleep(0.55)
                with self._lock:
                    self.in_flight += 1
            if mode == "slow":
                time.sleep(0.4)
            if mode == "fenced":
                content = f"```json\n{content}\n```"
            if mode == "prose":
                content = "This answer is reasonable and well argued overall."
            reply = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": request["model"],
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                             "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}).encode()
            if mode == "truncated" and first:
                reply = reply[: len(reply) // 2]
            self._send(handler, 200, reply)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self._lock:
                self.in_flight -= 1
