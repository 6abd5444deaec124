#!/usr/bin/env python3
"""An OTLP/HTTP sink for benchmarks: answers every POST with 200 and counts the spans it got
(a JSON body's "spanId" fields). Writes its port to the file given, and the counts to stdout
when it gets SIGTERM."""
import http.server, signal, sys, threading

counts = {"posts": 0, "spans": 0}
lock = threading.Lock()


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with lock:
            counts["posts"] += 1
            counts["spans"] += body.count(b'"spanId"')
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
with open(sys.argv[1], "w") as f:
    f.write(str(server.server_address[1]))


def stop(*_):
    print(f"otlp-sink: posts={counts['posts']} spans={counts['spans']}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
server.serve_forever()
