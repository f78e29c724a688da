"""Start `sglang.launch_server` with the arguments in a private JSON file (argv[1]):
{"args": [...], "api_key": "...", "log": "path", "owner_pid": N}. The key is read from the file, so it
is never on a command line; the output of the server and its child processes goes to `log` with the
key redacted; when the owner (the run that started the server) is gone, however it ended, the server
ends its own process group. With SOUP_SGLANG_FORK=1 (CPU servers) SGLang's scheduler and detokenizer
processes are forked instead of spawned."""

import json
import os
import signal
import stat
import sys
import threading
import time


def redirect_output(log_path: str, secret: str) -> None:
    """fd 1 and 2 (inherited by SGLang's scheduler and detokenizer processes) into a pipe whose lines
    reach the log file with `secret` replaced."""
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    needle = secret.encode() if secret else None

    def pump() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as src, os.fdopen(log_fd, "ab", buffering=0) as dst:
            for line in src:
                dst.write(line.replace(needle, b"<api-key>") if needle else line)

    threading.Thread(target=pump, name="redacted-log", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end_with_owner(owner_pid: int) -> None:
    def watch() -> None:
        while _running(owner_pid):
            time.sleep(1.0)
        print(f"the run that started this server (pid {owner_pid}) is gone; stopping", flush=True)
        os.killpg(0, signal.SIGTERM)
        time.sleep(10.0)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def server_argv(spec: dict) -> list[str]:
    """SGLang's arguments. The key goes as `--api-key=KEY`: a URL-safe key may start with "-", which
    argparse would take for an option if it were a separate word (the server then exits with usage)."""
    return list(spec["args"]) + ([f"--api-key={spec['api_key']}"] if spec.get("api_key") else [])


def fork_server_processes() -> None:
    """SGLang sets the "spawn" start method, so each of its child processes imports torch, transformers and
    SGLang again: 11-19 s of a CPU server's 33-39 s start here. Forked, they inherit this process's imports
    (healthy after 20 s). On CPU this process has started no CUDA and no OpenMP pool that a fork would break,
    and its own two threads (log pump, owner watch) hold no lock the children take; GPU servers keep "spawn",
    which CUDA needs."""
    import multiprocessing

    original = multiprocessing.set_start_method

    def set_start_method(method, force=False):
        print(f"soup_sglang_launch: SGLang's child processes are forked (it asked for {method!r})", flush=True)
        original("fork", force=True)

    multiprocessing.set_start_method = set_start_method


def main() -> None:
    path = sys.argv[1]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        sys.exit(f"{path}: server arguments hold an API key and must be private (mode 0600), not {oct(mode)}")
    with open(path, encoding="utf-8") as fh:
        spec = json.load(fh)
    redirect_output(spec["log"], spec.get("api_key", ""))
    if spec.get("owner_pid"):
        end_with_owner(spec["owner_pid"])
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    if os.environ.get("SOUP_SGLANG_FORK") == "1":
        fork_server_processes()
    server_args = prepare_server_args(server_argv(spec))
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
