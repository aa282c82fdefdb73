"""On a machine without CUDA, Triton kernels run on the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the test modules import kernels/.
"""
import http.server
import os
import socket
import threading

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


class FolderHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.root; server.fail[name] answers 500 that many times first; names in server.truncate
    (count) get their Content-Length but only half the bytes before the connection closes."""

    def do_GET(self):
        srv, name = self.server, self.path.lstrip("/")
        srv.requests.append(name)
        path = srv.root / name
        if not path.is_file():
            self.send_error(404)
            return
        if srv.fail.get(name, 0) > 0:
            srv.fail[name] -= 1
            self.send_error(500)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if srv.truncate.get(name, 0) > 0:
            srv.truncate[name] -= 1
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def serve_folder():
    """serve_folder(root) -> a local HTTP server of root's files (.url, .requests, .fail, .truncate), stopped
    after the test: what the download tests fetch from instead of the internet."""
    servers = []

    def start(root):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FolderHandler)
        srv.root, srv.requests, srv.fail, srv.truncate = root, [], {}, {}
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A base dir with the tiny dataset and tokenizer the CLI tests train on (tests copy it before changing it)."""
    from helpers import make_tiny_base
    return make_tiny_base(tmp_path_factory.mktemp("nanochat"))
