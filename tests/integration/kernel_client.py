"""Speaks NBD on file descriptor 3 as the kernel's client does after the
handshake (simple requests and replies), for test_tls.py's relay tests:
run under tests/integration/attach_socket.

    kernel_client.py SCRIPT

SCRIPT is a JSON file: a list of steps, run in order:
  ["write", cookie, offset, hexdata, flags]    send a WRITE
  ["read", cookie, offset, length]             send a READ
  ["flush" | "trim" | "zero" | "cache", cookie, offset, length, flags]
  ["wait", n]                                  take n replies
  ["say", text]                                print text, flush stdout
  ["disc"]                                     send DISC
Each reply prints one JSON line {"cookie", "error", "data" (hex, READ)};
the end of the stream prints {"eof": true}.
"""
import json
import socket
import struct
import sys

REQ, REP = 0x25609513, 0x67446698
TYPES = {"read": 0, "write": 1, "disc": 2, "flush": 3, "trim": 4, "cache": 5,
         "zero": 6}


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            return None
        b += chunk
    return b


def main():
    s = socket.socket(fileno=3)
    lengths = {}
    with open(sys.argv[1]) as f:
        script = json.load(f)
    for step in script:
        op = step[0]
        if op == "say":
            print(json.dumps({"say": step[1]}), flush=True)
        elif op == "wait":
            for _ in range(step[1]):
                hdr = recv_exact(s, 16)
                if hdr is None:
                    print(json.dumps({"eof": True}), flush=True)
                    return
                magic, err, cookie = struct.unpack(">IIQ", hdr)
                assert magic == REP, hex(magic)
                n = lengths.pop(cookie, 0)
                data = recv_exact(s, n) if n and not err else b""
                print(json.dumps({"cookie": cookie, "error": err,
                                  "data": data.hex() if data else ""}), flush=True)
        elif op == "disc":
            s.sendall(struct.pack(">IHHQQI", REQ, 0, 2, 0, 0, 0))
        else:
            cookie, offset = step[1], step[2]
            if op == "write":
                data = bytes.fromhex(step[3])
                flags = step[4] if len(step) > 4 else 0
                s.sendall(struct.pack(">IHHQQI", REQ, flags, 1, cookie, offset,
                                      len(data)) + data)
            else:
                length = step[3]
                flags = step[4] if len(step) > 4 else 0
                if op == "read":
                    lengths[cookie] = length
                s.sendall(struct.pack(">IHHQQI", REQ, flags, TYPES[op], cookie,
                                      offset, length))
    # At the end, wait for the relay to close (or for nothing).
    s.settimeout(5)
    try:
        rest = s.recv(1)
        print(json.dumps({"eof": rest == b""}), flush=True)
    except socket.timeout:
        print(json.dumps({"eof": False}), flush=True)


if __name__ == "__main__":
    main()
