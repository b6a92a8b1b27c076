"""The on-host guard: the swap, its watch and its undo, in one detached process.

This file is uploaded to the host (stdlib only, Python >= 3.6 there) with
its per-run configuration injected where ``CONFIG`` is defined; see
:func:`deployer.guardlink.render_guard`. Started with ``--detach`` it
forks into its own session and prints its pid; deployer starts it before the
window opens, so the swap itself is one SSH round trip (``touch go``) inside
the window, and a deployer killed right after opening the window still has
a guard on the host that closes it.

What it does, writing one JSON line per step to ``run_dir/status``:

0. ``armed``      started before the window opens, it waits for ``run_dir/go``
                  (deployer's swap step); no go by ``go_deadline`` or a
                  ``revert`` -> ``aborted`` (nothing changed), window closed;
1. ``backed_up``  copy the installed script to the backup path;
2. ``stopped``    stop the running client and check that it stopped;
3. ``swapped``    rename the staged script over the installed one (atomic);
4. ``started``    touch ``swap-mark`` and start the new client;
   ``ready``      the service's ``ready`` probe passed (if one is configured):
                  the NEW client reached the provider since ``swap-mark``;
5. then watch until one of:
   - ``run_dir/commit`` appears -> ``committed``, exit: the new script stays;
   - ``run_dir/revert`` appears, the new client's process dies, deployer
     stops touching ``run_dir/alive`` for ``silence_limit`` seconds (counted
     from ``go`` at the latest; the link's follower touches it for each line
     deployer writes on its channel, see ``link_follow``), or the deadline passes (``deadline`` from
     go; once ``run_dir/firstlife`` appears it tightens to ``soak_deadline``
     from then) -> revert: stop the new client, restore the backup, touch
     ``restore-mark``, start the old client, keep the window open until it
     reached the provider (its ready probe, or ``client_status`` online once
     ``offline_detection`` has passed since its start), then call
     ``set_allow_clientless(false)`` itself and write ``reverted``; when
     deployer went silent and had opened the tunnel itself
     (``tunnel_opened``), also ``disconnect``.

Every deadline runs on the host's monotonic clock: a wall-clock step (NTP on
a board without a real-time clock) neither reverts a healthy upgrade nor
hides a vanished deployer.

So a deployer that vanishes at any moment leaves neither an open window nor
a host without a client. ``--revert`` runs only the undo (``deployer`` uses
it when the guard of a run died before it finished, e.g. the host rebooted).
The guard deletes its own file (it holds API credentials) as soon as it has
read it.

The same file is also deployer's program on the host for the link (see
``link_main``): run without CONFIG as ``python3 -c``, it takes the lock and
inspects, stages and starts the guard, follows the guard's status over the
same channel, and cleans up, one SSH round trip per task.
"""

import hashlib
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time

CONFIG = {}  # replaced per run by deployer.guardlink.render_guard

POLL = 0.1  # seconds between looks at the control files and the client
GO_POLL = 0.02  # while armed: the swap's start is inside the exposure window
READY_POLL = 0.05  # seconds between runs of the ready probe (it is inside the window)
READY_FAST = 1.0  # ... for this long after the swap; a client that takes longer is slow
READY_BACKOFF = 0.5  # then: each run forks a shell, which a small host's client needs
STATUS_EVERY = 1.0  # seconds between the guard's own client_status calls
STOP_WAIT = 8.0  # seconds a client gets to stop after SIGTERM before SIGKILL
SLOW_STOP_WAIT = 30.0  # more seconds for a client whose stop is asynchronous (command kind)
ABORT_GRACE = 120.0  # seconds an aborted guard keeps a late-exiting old client running
REVERT_ONLINE_WAIT = 30.0  # default seconds to wait for the restored client's evidence
CLOSE_WINDOW_FOR = 90.0  # seconds to keep retrying set_allow_clientless(false)
DISCONNECT_FOR = 30.0  # seconds to keep retrying disconnect for a vanished deployer


class Guard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = cfg["run_dir"]
        self.status_path = os.path.join(self.run_dir, "status")
        self.service = make_service(cfg["service"])
        self.terminated = False
        self.swapped = False
        # deployer's liveness, on this host's monotonic clock: the last time the
        # mtime of ``alive`` changed (a wall-clock step must not fake or hide it)
        self.heard = time.monotonic()
        self.alive_seen = None

    # -- status and control files ------------------------------------------

    def status(self, state, **data):
        data.update(state=state, t=round(time.time(), 3), pid=os.getpid())
        line = json.dumps(data, sort_keys=True) + "\n"
        with open(self.status_path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def control(self, name):
        return os.path.exists(os.path.join(self.run_dir, name))

    # -- the swap -------------------------------------------------------------

    def run(self):
        cfg = self.cfg
        if not self.wait_for_go():
            return 1
        started = time.monotonic()
        self.heard = started  # silence counts from go at the latest
        self.status("running", deadline=cfg["deadline"])
        backup = self.backup()
        if self.service.running():
            self.service.stop()
            if self.service.running() and not self.wait_stopped(SLOW_STOP_WAIT):
                return self.keep_old_client("the old client did not stop")
        self.status("stopped")
        try:
            os.replace(cfg["staged_path"], cfg["script_path"])
        except OSError as exc:
            self.service.start()
            self.status("aborted", reason="rename failed: %s" % exc, changed=True)
            self.close_window()
            return 1
        self.swapped = True
        self.status("swapped")
        try:
            return self.watch(started, backup)
        except Exception as exc:  # noqa: BLE001 - any surprise before commit: undo
            return self.revert("guard error: %s: %s" % (type(exc).__name__, exc), backup)

    def wait_stopped(self, seconds):
        """A stop command may return before the client has exited (an asynchronous
        ``stop`` of the command kind, a client in its retry backoff): give it more
        time. False if it still runs, or deployer asked to give up meanwhile."""
        self.status("stopping", reason="the old client is slow to stop", wait=seconds)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self.service.running():
                return True
            if self.control("revert") or self.terminated:
                return False
            time.sleep(POLL)
        return not self.service.running()

    def keep_old_client(self, reason):
        """Nothing was changed, but the old client has been told to stop and may
        still exit later: keep it running. The window is closed now (the old
        client runs, its tunnel stays); for ``ABORT_GRACE`` seconds an exit is
        answered with a start, until another run takes the host lock."""
        closed = self.close_window()
        self.status("aborted", reason=reason, changed=False, window_closed=closed)
        end = time.monotonic() + ABORT_GRACE
        while time.monotonic() < end and not self.lock_taken_by_another_run():
            if not self.service.running():
                self.service.start()
                log("the old client exited after its stop was given up: started it again")
            time.sleep(POLL * 5)
        return 1

    def lock_taken_by_another_run(self):
        """This run's host lock (``base/lock/owner``) now names another run."""
        base = os.path.dirname(os.path.dirname(self.run_dir))
        try:
            with open(os.path.join(base, "lock", "owner")) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            return False  # no lock: deployer is done with the host, nobody else started
        run_id = os.path.basename(self.run_dir)
        return isinstance(owner, dict) and owner.get("run_id") not in (None, run_id)

    def wait_for_go(self):
        """Armed before the window opens; the swap starts when ``go`` appears.

        Without ``go`` by ``go_deadline`` (deployer gone between opening the
        window and the swap), or on ``revert``, give up: nothing was changed,
        and the window deployer may have opened is closed.
        """
        self.status("armed", go_deadline=self.cfg["go_deadline"])
        end = time.monotonic() + self.cfg["go_deadline"]
        while not self.control("go"):
            if not os.path.isdir(self.run_dir):
                return False  # deployer cleaned this run up: nothing to do, nothing to close
            reason = None
            if self.control("revert") or self.terminated:
                reason = "disarmed before the swap"
            elif time.monotonic() > end:
                reason = "no go from deployer before the go deadline"
            if reason:
                closed = self.close_window()
                gone = reason.startswith("no go")
                disconnected = self.disconnect() if gone else None
                self.status(
                    "aborted",
                    reason=reason,
                    changed=False,
                    window_closed=closed,
                    disconnected=disconnected,
                )
                return False
            time.sleep(GO_POLL)
        return True

    def backup(self):
        """Copy the installed script to the backup path, owner-only whatever its
        mode (it holds credentials): 0700 if its owner may run it, else 0600."""
        script, backup = self.cfg["script_path"], self.cfg["backup_path"]
        if not os.path.exists(script):
            self.status("backed_up", backup=None)
            return None
        folder = os.path.dirname(backup)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # one made by an older deployer may be open to others
        tmp = backup + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)  # a leftover: its mode is not ours to keep
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as dst, open(script, "rb") as src:
            shutil.copyfileobj(src, dst)
        shutil.copystat(script, tmp)  # times and attributes as copy2 did; the mode is reset:
        os.chmod(tmp, 0o700 if os.stat(script).st_mode & 0o100 else 0o600)
        fsync_file(tmp)
        os.replace(tmp, backup)
        self.status("backed_up", backup=backup)
        return backup

    def watch(self, started, backup):
        cfg = self.cfg
        mark = self.mark("swap-mark")
        pid = self.service.start()
        self.status("started", client_pid=pid)
        deadline = started + cfg["deadline"]
        tightened = False
        ready = not cfg.get("ready")  # without a probe deployer judges first life
        next_probe = 0.0
        while True:
            if self.control("commit"):
                self.status("committed")
                return 0
            now = time.monotonic()
            if not ready and now >= next_probe:
                ready = self.probe(mark)
                next_probe = now + ready_poll(now, mark)
                if ready:
                    self.status("ready", after=round(now - mark[1], 3))
            if not tightened and self.control("firstlife"):
                tightened = True
                deadline = min(deadline, now + cfg["soak_deadline"])
                self.status("first_life", deadline_in=round(deadline - now, 3))
            reason, vanished, asked = None, False, False
            if self.control("revert"):
                reason, asked = "deployer asked for a revert", True
            elif self.terminated:  # a shutdown: revert and exit, do not linger
                reason, asked = "the guard was terminated", True
            elif self.deployer_silent(now):
                reason, vanished = "deployer went silent before the commit", True
            elif now > deadline:
                reason = "deadline passed without a commit"
            elif not self.service.running():
                reason = "the new client's process exited"
            if reason:
                return self.revert(reason, backup, vanished, asked)
            time.sleep(POLL)

    def mark(self, name):
        """Touch ``run_dir/NAME`` just before a client starts: the ready probe
        passes once the client's good-poll file is newer than it."""
        path = os.path.join(self.run_dir, name)
        with open(path, "w") as fh:
            fh.write("%.3f\n" % time.time())
        return path, time.monotonic(), time.time()

    def probe(self, mark):
        """The service's ready probe: did the client started after ``mark`` poll?"""
        env = dict(os.environ)
        env.update(DEPLOYER_SWAP_MARK=mark[0], DEPLOYER_SWAP_TIME="%.3f" % mark[2])
        return shell(self.cfg["ready"], timeout=20, env=env) == 0

    def deployer_silent(self, now):
        """Deployer touches ``alive`` each time it reads the status; a deployer
        that vanished (killed, its machine or network gone) stops doing so. Then
        waiting for the deadline would only keep the window open longer."""
        limit = self.cfg.get("silence_limit")
        try:
            seen = os.stat(os.path.join(self.run_dir, "alive")).st_mtime_ns
        except OSError:
            seen = None
        if seen != self.alive_seen:
            self.alive_seen, self.heard = seen, now
        return bool(limit) and now - self.heard > limit

    # -- the undo -------------------------------------------------------------

    def revert(self, reason, backup, vanished=False, asked=False):
        """Undo the swap; ``vanished``: deployer is gone (not just slow), so the
        tunnel it opened is closed too once the host is safe. A revert deployer
        did not ask for (the deadline, the new client's exit) may have come
        before its silence did: then the guard waits for that too (see
        ``silent_after``). ``asked``: deployer asked for it, or the guard was
        terminated; either way it does not wait."""
        cfg = self.cfg
        self.status("reverting", reason=reason)
        self.service.stop()
        if backup:
            tmp = cfg["script_path"] + ".deployer-restore"
            shutil.copy2(backup, tmp)
            if os.path.exists(cfg["script_path"]):
                # the inventory's mode (a 0750 script read by a group member), not
                # the backup's owner-only one
                shutil.copymode(cfg["script_path"], tmp)
            fsync_file(tmp)
            os.replace(tmp, cfg["script_path"])
        mark = self.mark("restore-mark")
        pid = self.service.start()
        self.status("restored", client_pid=pid, backup=backup)
        running = self.wait_restored(mark)
        closed = self.close_window()
        gone = vanished or (not asked and self.silent_after())
        disconnected = self.disconnect() if gone else None
        self.status("reverted", ok=running, window_closed=closed, disconnected=disconnected)
        return 2

    def silent_after(self):
        """After a revert deployer did not ask for, with a tunnel it opened: is it
        gone? True once it has been silent for ``silence_limit``, False as soon
        as it is heard (it reads the status, so it cleans up itself)."""
        cfg = self.cfg
        if not (cfg.get("silence_limit") and cfg.get("api") and cfg.get("tunnel_opened")):
            return False
        heard = self.heard
        while not self.deployer_silent(time.monotonic()):
            if self.heard != heard:
                return False
            time.sleep(POLL)
        return True

    def wait_restored(self, mark):
        """Keep the window open until the restored client has reached the provider:
        its ready probe passes, or ``client_status`` reads online once the new
        client's last polls have aged out (``offline_detection`` after the
        restart). Closing on a stale "online" would let the provider cut the
        tunnel of a restored client that has not polled yet."""
        cfg = self.cfg
        aged = mark[1] + cfg.get("offline_detection", 0.0)
        end = mark[1] + cfg.get("revert_online_wait", REVERT_ONLINE_WAIT)
        next_ask = aged  # client_status at most once per STATUS_EVERY: the API is shared
        while time.monotonic() < end:
            if self.service.running():
                if cfg.get("ready") and self.probe(mark):
                    return True
                now = time.monotonic()
                if now >= next_ask:
                    next_ask = now + STATUS_EVERY
                    if api_online(cfg.get("api")):
                        return True
            time.sleep(ready_poll(time.monotonic(), mark))
        return self.service.running()

    def disconnect(self):
        """deployer opened the tunnel and vanished: close it once the host is safe,
        so no tunnel stays open that nobody uses."""
        api = self.cfg.get("api")
        if not api or not self.cfg.get("tunnel_opened"):
            return None
        end, delay = time.monotonic() + DISCONNECT_FOR, 0.2
        while True:
            reply = api_call(api, "disconnect")
            if reply and reply.get("success"):
                return True
            if time.monotonic() > end:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def close_window(self):
        api = self.cfg.get("api")
        if not api:
            return False
        end, delay = time.monotonic() + CLOSE_WINDOW_FOR, 0.2
        while True:
            reply = api_call(api, "set_allow_clientless", allow="false")
            if reply and reply.get("success") and reply.get("allow_clientless") is False:
                return True
            if time.monotonic() > end:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# -- the provider API, from the host ------------------------------------------


def api_call(api, call, **extra):
    # Imported here, not at the top: only a revert calls the API, and
    # urllib.request is most of what a start of this file costs the host (about
    # 33 ms of CPU of ~55 on a PC, several times that on a Pi), which every
    # link task and every guard would pay for nothing.
    import urllib.parse
    import urllib.request

    params = dict(api["params"])
    params.update(extra)
    url = api["url"].replace("{call}", call) + "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=api.get("timeout", 10)) as resp:  # noqa: S310
            return json.loads(resp.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - any failure is "no answer"; the caller retries
        return None


def api_online(api):
    if not api:
        return True
    reply = api_call(api, "client_status")
    return bool(reply and reply.get("success") and reply.get("message") == "online")


# -- service kinds ----------------------------------------------------------------


def make_service(svc):
    kind = svc["kind"]
    if kind == "pidfile":
        return PidfileService(svc)
    if kind == "systemd":
        return CommandService(
            start="systemctl start " + svc["unit_q"],
            stop="systemctl stop " + svc["unit_q"],
            check="systemctl is-active --quiet " + svc["unit_q"],
        )
    return CommandService(start=svc["start"], stop=svc["stop"], check=svc["check"])


def shell(command, timeout=60, env=None):
    try:
        return subprocess.run(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            env=env,
        ).returncode
    except subprocess.TimeoutExpired:
        return 124


class CommandService:
    def __init__(self, start, stop, check):
        self.start_cmd, self.stop_cmd, self.check_cmd = start, stop, check
        self.last_check = 0.0
        self.last_result = True

    def running(self):
        # a check command may be costly: ask at most twice a second
        now = time.monotonic()
        if now - self.last_check >= 0.5:
            self.last_result = shell(self.check_cmd, timeout=20) == 0
            self.last_check = now
        return self.last_result

    def start(self):
        shell(self.start_cmd)
        self.last_check = 0.0
        return None

    def stop(self):
        shell(self.stop_cmd)
        end = time.monotonic() + STOP_WAIT
        self.last_check = 0.0
        while self.running() and time.monotonic() < end:
            time.sleep(0.2)
            self.last_check = 0.0


class PidfileService:
    """Start ``run`` in its own session and keep its pid in ``pidfile``."""

    def __init__(self, svc):
        self.pidfile, self.run_cmd, self.log = svc["pidfile"], svc["run"], svc["log"]
        self.child = None

    def pid(self):
        try:
            with open(self.pidfile) as fh:
                return int(fh.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def running(self):
        pid = self.pid()
        if pid is None:
            return False
        if self.child is not None and self.child.pid == pid:
            return self.child.poll() is None
        return pid_alive(pid)

    def start(self):
        os.makedirs(os.path.dirname(self.log) or ".", exist_ok=True)
        with open(self.log, "ab") as log, open(os.devnull, "rb") as devnull:
            self.child = subprocess.Popen(
                ["/bin/sh", "-c", "exec " + self.run_cmd],
                stdin=devnull,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=os.path.dirname(self.pidfile) or "/",
            )
        tmp = self.pidfile + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("%d\n" % self.child.pid)
        os.replace(tmp, self.pidfile)
        return self.child.pid

    def stop(self):
        pid = self.pid()
        if pid is None or not self.running():
            return
        for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, 3.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if not self.running():
                    return
                time.sleep(0.05)


def log(message):
    """A line in the guard's log (its stderr, guard.log in the run dir)."""
    sys.stderr.write("%s guard: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), message))
    sys.stderr.flush()


def ready_poll(now, mark):
    """Seconds until the next ready probe: often at first, then less."""
    return READY_POLL if now - mark[1] < READY_FAST else READY_BACKOFF


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- deployer's link: one SSH channel per task ------------------------------------------
#
# deployer (deployer.guardlink) runs ``python3 -c BOOT N OP RUN_DIR`` over one SSH
# channel and writes to its stdin this file's source (N bytes, no CONFIG), one
# JSON line of OP's arguments, then OP's data; OP answers in JSON lines on
# stdout. So each task is one round trip, and nothing forks on the host but
# what the task must run (``validate``, the guard itself).
#
#   inspect  take the host lock and read the installed script's sha256 and mode
#   stage    write the staged script and the guard (their bytes follow the
#            arguments), set modes, check both sha256, run ``validate``, start
#            the guard armed, then follow it (below) on the same channel
#   follow   write each new line of the guard's status to stdout as it appears;
#            each line deployer writes is its sign of life (touch ``alive``),
#            the words go/firstlife/commit/revert become control files, and
#            ``sync`` is answered with ``{"synced": true}`` once every line
#            written so far was sent (``{"reset": true}``: the file was cut);
#            ``cleanup ARGS`` runs the cleanup task below, answers, and ends
#            the follower (the run's last round trip rides on its stream).
#            It ends when deployer's end closes (EOF) or the run dir is gone.
#   cleanup  prune backups (owner-only), remove the run dir, release the lock

FOLLOW_POLL = 0.05  # seconds between looks at the status file while following
LINK_WORDS = ("go", "firstlife", "commit", "revert")  # deployer.guardlink.CONTROLS
CLEANUP_WORD = "cleanup "  # + the cleanup task's arguments (JSON), on the stream


class LinkInput:
    """Deployer's end of the channel, read unbuffered (so ``select`` tells the truth)."""

    def __init__(self, fd=0):
        self.fd, self.buf = fd, b""

    def fill(self, timeout=None):
        """One read (after at most ``timeout`` s of waiting); False at EOF."""
        if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
            return True
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self):
        while b"\n" not in self.buf:
            if not self.fill():
                raise EOFError("deployer's end closed")
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def exactly(self, size):
        while len(self.buf) < size:
            if not self.fill():
                raise EOFError("deployer's end closed")
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


def answer(**data):
    write_all(1, (json.dumps(data, sort_keys=True) + "\n").encode("utf-8"))


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def touch(path):
    try:
        with open(path, "a"):
            os.utime(path, None)
    except OSError:
        pass


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(65536), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def link_inspect(args):
    lock = args.get("lock")
    taken = None
    if lock:
        if args.get("break_lock"):
            shutil.rmtree(lock, ignore_errors=True)
        try:
            if not os.path.isdir(args["base"]):
                os.makedirs(args["base"])
            os.mkdir(lock)
        except FileExistsError:
            answer(lock="held", owner=read_json(os.path.join(lock, "owner")))
            return 0
        except OSError as exc:
            answer(lock="error", error=str(exc))
            return 0
        with open(os.path.join(lock, "owner"), "w") as fh:
            fh.write(args["owner"])
        taken = "taken"
    script, sha, mode = args["script"], None, None
    if os.path.isfile(script):
        sha = sha256_file(script)
        mode = "%04o" % (os.stat(script).st_mode & 0o7777)
    answer(lock=taken, sha256=sha, mode=mode)
    return 0


def link_stage(args, inp):
    os.umask(0o077)
    for folder in (args["backups"], args["run_dir"]):
        if not os.path.isdir(folder):
            os.makedirs(folder)
    script, guard = inp.exactly(args["sizes"][0]), inp.exactly(args["sizes"][1])
    for path, data, mode in (
        (args["staged"], script, int(args["mode"], 8)),
        (args["guard"], guard, 0o700),
    ):
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)
    owner_of = args.get("owner_of")  # sudo: the installed script's owner, as it was
    if owner_of and os.path.exists(owner_of):
        st = os.stat(owner_of)
        os.chown(args["staged"], st.st_uid, st.st_gid)
    got = [sha256_file(args["staged"]), sha256_file(args["guard"])]
    if got != args["sha256"]:
        answer(error="sha256", sha256=got)
        return 1
    if args.get("validate"):
        proc = subprocess.run(
            ["/bin/sh", "-c", args["validate"]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
            # deployer masks credentials and then keeps the last 300 characters: send
            # more, so a credential is never cut in two before it is masked
            answer(error="validate", exit=proc.returncode, output=out[-4000:])
            return 1
    answer(staged=True)
    proc = subprocess.run(
        [sys.executable, "-S", "guard.py", "--detach"],  # no site: stdlib only
        cwd=args["run_dir"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=30,
    )
    out = proc.stdout.decode("utf-8", "replace").strip()
    try:
        pid = int(out.splitlines()[-1])  # --detach prints the guard's pid
    except (ValueError, IndexError):
        answer(error="guard", output=out[-300:])
        return 1
    answer(armed=pid)
    return link_follow(args["run_dir"], inp)


def link_follow(run_dir, inp):
    status, alive = os.path.join(run_dir, "status"), os.path.join(run_dir, "alive")
    seen = [0, b""]  # how far the status file was sent, and its incomplete last line

    def send_new():
        try:
            with open(status, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < seen[0]:
                    seen[:] = [0, b""]  # the file was replaced or cut: from the start
                    write_all(1, b'{"reset": true}\n')
                fh.seek(seen[0])
                data = fh.read()
        except OSError:
            if seen[0]:  # it is gone: what deployer saw of it is no longer there
                seen[:] = [0, b""]
                write_all(1, b'{"reset": true}\n')
            return
        if data:
            seen[0] += len(data)
            done, _, seen[1] = (seen[1] + data).rpartition(b"\n")
            if done:
                write_all(1, done + b"\n")

    try:
        while True:
            send_new()
            if not inp.fill(FOLLOW_POLL):
                return 0  # deployer closed its end (or vanished: sshd closed it)
            synced = False
            while b"\n" in inp.buf:
                word = inp.line().decode("utf-8", "replace").strip()
                touch(alive)
                if word in LINK_WORDS:
                    touch(os.path.join(run_dir, word))
                elif word.startswith(CLEANUP_WORD):
                    send_new()  # what the guard wrote before it, then the answer
                    return link_cleanup_answered(json.loads(word[len(CLEANUP_WORD) :]))
                synced = synced or word == "sync"
            if synced:  # deployer wants the status as it is now
                send_new()
                write_all(1, b'{"synced": true}\n')
            if not os.path.isdir(run_dir):
                return 0
    except OSError:
        return 0  # deployer's end is gone


def link_cleanup(args):
    pruned = []
    backups = args["backups"]
    if args.get("keep") is not None and os.path.isdir(backups):
        names = sorted(
            n
            for n in os.listdir(backups)
            if n.startswith(args["prefix"]) and not n.endswith(".tmp")
        )
        for name in names[: max(0, len(names) - args["keep"])]:
            os.unlink(os.path.join(backups, name))
            pruned.append(os.path.join(backups, name))
        for top, _dirs, files in os.walk(backups):  # chmod -R go-rwx: they hold credentials
            for path in [top] + [os.path.join(top, n) for n in files]:
                mode = os.lstat(path).st_mode
                if not stat.S_ISLNK(mode):
                    os.chmod(path, mode & 0o7700)
    if args.get("run_dir"):
        shutil.rmtree(args["run_dir"], ignore_errors=True)
    lock = args.get("lock")
    if lock:
        owner = read_json(os.path.join(lock, "owner"))
        if not (isinstance(owner, dict) and owner.get("run_id") not in (None, args["run_id"])):
            shutil.rmtree(lock, ignore_errors=True)
    answer(pruned=pruned)
    return 0


def link_cleanup_answered(args):
    """The cleanup task asked for on the stream: its failure is answered there too
    (the follower's own OSError handling would end it without a word)."""
    try:
        return link_cleanup(args)
    except OSError as exc:
        answer(error="os", output=str(exc))
        return 1


def link_main(argv):
    op = argv[0] if argv else ""
    inp = LinkInput(0)
    args = json.loads(inp.line().decode("utf-8"))
    try:
        if op == "inspect":
            return link_inspect(args)
        if op == "stage":
            return link_stage(args, inp)
        if op == "follow":
            return link_follow(args["run_dir"], inp)
        if op == "cleanup":
            return link_cleanup(args)
    except EOFError:
        return 0
    except OSError as exc:
        answer(error="os", output=str(exc))
        return 1
    answer(error="unknown link op %r" % op)
    return 64


# -- start-up ---------------------------------------------------------------------------


def detach(log_path):
    """Fork into a new session; the parent prints the guard's pid and exits."""
    pid = os.fork()
    if pid:
        sys.stdout.write("%d\n" % pid)
        sys.stdout.flush()
        os._exit(0)
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main(argv):
    cfg = CONFIG
    if "--detach" in argv:
        detach(os.path.join(cfg["run_dir"], "guard.log"))
    try:
        os.unlink(os.path.abspath(__file__))  # it holds credentials: gone once read
    except OSError:
        pass
    guard = Guard(cfg)

    def on_term(signum, frame):
        guard.terminated = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if "--revert" in argv:  # the run's own guard is gone: undo its swap
            backup = cfg["backup_path"] if os.path.exists(cfg["backup_path"]) else None
            return guard.revert(
                "the guard of this run is gone; reverting for deployer", backup, asked=True
            )
        return guard.run()
    except Exception as exc:  # noqa: BLE001 - last line of defence: report and undo
        if not os.path.isdir(cfg["run_dir"]) and not guard.swapped:
            return 4  # disarmed by cleanup before it swapped: this run is over
        try:
            guard.status("error", reason="%s: %s" % (type(exc).__name__, exc))
        except Exception:  # noqa: BLE001 - even the status file may be the problem
            pass
        if not (os.path.exists(cfg["script_path"]) and guard.service.running()):
            guard.service.start()
        guard.close_window()  # whatever happened, never leave the window open
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
