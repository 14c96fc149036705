"""The floor for a Python controller on paramiko: the least such a tool can do to run a
module on N hosts and show its output.

It imports paramiko alone, connects to every host at once, runs the target's own
`staprun MODULE` (C: no agent, no interpreter started on the target) on each, and prints
each line as `HOST: line`. stapctl does all of that and more (a manifest, an inventory, a
cache, an agent, a history), so its time cannot go below this one's on the same guests:
bench/run measures both, and the floor's ratio against stap --remote bounds stapctl's.

    floor.py KO KEY KNOWN_HOSTS USER@ADDRESS:PORT...

What a guest sends is bounded (a line, its error text) and its errors are escaped
(ascii()) before they reach the bench's terminal.
"""

from __future__ import annotations

import sys
import threading

import paramiko

MAX_LINE = 64 << 10  # bytes read of one output line at most
MAX_ERROR = 4096  # bytes kept of staprun's stderr
USAGE = "usage: floor.py KO KEY KNOWN_HOSTS USER@ADDRESS:PORT..."


def run_on(target: str, ko: str, key: str, known_hosts: str, out: threading.Lock,
           failed: list[str]) -> None:
    user, _, place = target.partition("@")
    address, _, port = place.rpartition(":")
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(address, int(port), user, key_filename=key, look_for_keys=False,
                       allow_agent=False, timeout=30)
        _, stdout, stderr = client.exec_command(f"staprun {ko}")
        while line := stdout.readline(MAX_LINE):
            with out:
                sys.stdout.write(f"{place}: {line}")
                sys.stdout.flush()
        if stdout.channel.recv_exit_status() != 0:
            failed.append(f"{target}: {ascii(stderr.read(MAX_ERROR).decode(errors='replace'))}")
    except (OSError, paramiko.SSHException) as e:
        failed.append(f"{target}: {ascii(str(e))}")
    finally:
        client.close()


def main() -> int:
    if len(sys.argv) < 5:
        print(USAGE, file=sys.stderr)
        return 2
    ko, key, known_hosts, *targets = sys.argv[1:]
    out = threading.Lock()
    failed: list[str] = []
    threads = [threading.Thread(target=run_on, args=(t, ko, key, known_hosts, out, failed))
               for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for problem in failed:
        print(f"floor: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
