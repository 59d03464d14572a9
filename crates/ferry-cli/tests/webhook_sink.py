"""A webhook receiver for the alert tests: answers every POST with 204 and prints one JSON line
per request on stdout ({"path", "authorization", "body"}). The first line is {"port": N}.

Usage: webhook_sink.py   (listens on 127.0.0.1, a free port)
"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode("utf-8", "replace")
        try:
            body = json.loads(body)
        except ValueError:
            pass
        print(json.dumps({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Sink)
print(json.dumps({"port": server.server_address[1]}), flush=True)
server.serve_forever()
