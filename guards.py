"""
guards.py: what keeps a training run from losing a user's work or keeping a broken result. train.py
calls each at one place; each closes one way it could go wrong:

    check_ranges(args)         every numeric flag inside its interval (RANGES): --lr 0 or --batch-size 0
                               is an error, never "the default"
    check_device(name)         --device names a device this machine has
    claim(out, ...)            one run at a time: out/.lock is held with fcntl.flock for the run's life
                               (the kernel drops it when the process dies, so a killed run never blocks
                               the next); a folder that already holds a run is refused unless --resume
                               or --overwrite says what to do with it, and then left byte-identical
    clear(out)                 --overwrite: remove the previous run's files (only those train.py writes)
    read_state(path, device)   out/checkpoint/state.pt, with one-line errors for a truncated or foreign file
    check_resume_args(...)     --resume refuses a flag that would change the run, naming it and both
                               values; MAY_CHANGE lists those that cannot (when to evaluate, log, save;
                               where it runs)
    sigterm_saves()            inside it SIGTERM raises KeyboardInterrupt, so it saves like Ctrl-C
    check_finite(...)          a NaN/inf loss, gradient norm or adapter weight stops the run, naming the step

and two that every script and every save share:

    HelpFormatter              --help states each flag's default once (train.py, generate.py, bench.py,
                               selection.py)
    atomic_folder(path)        the one folder writer every save goes through (checkpoints, adapters, merged
                               models, converted GGUF files): assembled beside, fsynced, renamed into place,
                               the previous version never deleted before the new one is there; recover_folder
                               puts back a previous version that an interrupted save left as path.prev

What is guaranteed and what is not: README.md, "Reliability". Checked in test_all.py (the reliability
tests of train.py: a used folder is refused and stays byte-identical, the lock and a stale lock, the
resume rules, SIGTERM then --resume equals the uninterrupted run, a diverging run stops and saves
nothing non-finite, each bad flag is one line).
"""

import argparse
import errno
import fcntl
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager

import torch

# What train.py writes into --out: its log and three folders, each saved by atomic_folder, which leaves
# NAME.prev when a save is interrupted between its two renames (recover_folder moves it back). A process
# killed while writing also leaves its hidden .NAME.tmp-* folder: no complete version, nothing reads it.
RUN_FILES = ("log.jsonl",) + tuple(f"{d}{s}" for d in ("checkpoint", "best", "last") for s in ("", ".prev"))
STATE_KEYS = ("trainable", "optimizer", "step", "best", "rng", "args")
# Flags a resumed run may change: they decide when to evaluate, log and save and where the run executes,
# not what it computes. A different --micro-batch-size, --gradient-checkpointing or --device gives the same
# updates up to float rounding (the accumulation and checkpointing tests); every other flag is compared.
MAY_CHANGE = ("out", "resume", "overwrite", "eval_every", "eval_before", "eval_batch_size", "log_every", "save_every",
              "save_minutes", "threads", "device", "micro_batch_size", "memory_budget", "gradient_checkpointing")


# ----------------------------------------------------------------------------------------------------
# Flags: ranges and the device


def flag(name):
    return "--" + name.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """--help states each default once: appended as "(default: X)" unless the help text states it
    already ("(default ...", "default: ...") or there is nothing to state (None, False: an unset flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "(default" in text or "default:" in text or unset or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


# The allowed values of every numeric flag, as intervals ("[" includes the end, "(" excludes it). None
# (a default chosen later) passes; NaN and inf never do. Checked before anything runs, so that --lr 0 or
# --batch-size 0 is an error instead of quietly meaning "the default".
RANGES = {
    "r": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)", "num_experts": "[1, inf)",
    "top_k": "[1, inf)", "top_p": "(0, 1]", "temperature": "[0, inf)", "capacity_factor": "(0, inf)",
    "jitter_noise": "[0, 1)", "router_aux_loss_coef": "[0, inf)", "router_z_loss_coef": "[0, inf)",
    "val_fraction": "(0, 1)", "max_train": "[0, inf)", "max_eval": "[0, inf)", "max_len": "[2, inf)",
    "num_labels": "[0, inf)", "epochs": "(0, inf)", "steps": "[0, inf)", "batch_size": "[1, inf)",
    "micro_batch_size": "[0, inf)", "lr": "(0, inf)", "lora_plus_ratio": "[1, inf)", "warmup_ratio": "[0, 1)",
    "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "threads": "[0, inf)", "seed": "[0, inf)",
    "eval_every": "[0, inf)", "eval_batch_size": "[1, inf)", "log_every": "[1, inf)", "save_every": "[0, inf)",
    "save_minutes": "[0, inf)", "quality_loss_weight": "[0, inf)", "router_init_range": "[0, inf)",
    "blc_weight": "[0, inf)", "blc_alpha": "[0, 1)",
}


def check_ranges(args):
    """One-line error for the first numeric flag outside its RANGES interval."""
    for name, spec in RANGES.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        inside = (v >= lo if spec[0] == "[" else v > lo) and (v <= hi if spec[-1] == "]" else v < hi)
        if not (math.isfinite(v) and inside):
            raise ValueError(f"{flag(name)} {v}: expected a value in {spec}")


def check_device(name):
    """torch.device(name) for cpu, cuda or cuda:N, with a one-line error when it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


# ----------------------------------------------------------------------------------------------------
# The folder: lock, refusal to reuse, --overwrite


def make_folder(out):
    """Create --out, with a one-line error when it is a file or cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, expected a folder")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


@contextmanager
def claim(out, resume=False, overwrite=False):
    """Hold the folder `out` for the block: refuse it while another process holds out/.lock, and refuse a
    folder that holds a run unless resume (continue it) or overwrite (replace it) is given."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run in --out, or replace it")
    make_folder(out)
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise ValueError(f"--out {out}: another run (pid {pid}) is using this folder; wait for it to end "
                             "or choose another --out") from None
        used = run_files(out)
        if used and not (resume or overwrite):  # refused before writing anything: the folder stays as it was
            raise ValueError(f"--out {out} already holds a run ({', '.join(used)}); continue it with --resume, "
                             "or replace it with --overwrite")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for the message above; the lock itself is the flock
        yield
    finally:
        os.close(fd)  # releases the lock


def run_files(out):
    """The RUN_FILES in `out` and in its sub-folders (several adapters train into OUT/NAME), relative to out."""
    subs = [d for d in sorted(os.listdir(out)) if os.path.isdir(os.path.join(out, d)) and d not in RUN_FILES]
    return [os.path.join(d, n) for d in [""] + subs for n in RUN_FILES if os.path.exists(os.path.join(out, d, n))]


def clear(out):
    """--overwrite: delete the previous run's files (run_files); anything else in the folder stays."""
    for name in run_files(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


# ----------------------------------------------------------------------------------------------------
# Saving: one atomic folder writer, and a failed save as one line


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(path, keep_others=False, drop=()):
    """Write a folder atomically: `with atomic_folder(path) as tmp:` writes into tmp, a folder beside
    `path`; on leaving the block every file and tmp itself are fsynced, the previous `path` (if any) is
    renamed to `path.prev`, tmp to `path`, the parent fsynced, and only then is `path.prev` deleted.
    The previous version is therefore never deleted before the new one is complete and in place: an
    exception inside the block (or a crash) before the renames leaves it untouched; a crash between
    the two renames leaves it as `path.prev`, which recover_folder (called by the loaders) moves back.
    keep_others=True hard-links (or copies) into the new version the files of the previous one that
    the new one does not write, except the names in `drop` (a user's notes beside an adapter survive)."""
    path = os.path.abspath(path)
    parent, prev = os.path.dirname(path), path + ".prev"
    os.makedirs(parent, exist_ok=True)
    recover_folder(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                                   # mkdtemp makes it private; a folder is not
    try:
        yield tmp
        if keep_others and os.path.isdir(path):
            for name in sorted(set(os.listdir(path)) - set(os.listdir(tmp)) - set(drop)):
                src, dst = os.path.join(path, name), os.path.join(tmp, name)
                if os.path.isdir(src):
                    shutil.copytree(src, dst)
                else:
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(root, name))
            _fsync(root, directory=True)
        shutil.rmtree(prev, ignore_errors=True)                     # a complete `path` exists (recovered)
        if os.path.exists(path):
            os.replace(path, prev)                                  # the previous version set aside
        try:
            os.replace(tmp, path)                                   # the new one in place
        except OSError:
            if os.path.exists(prev) and not os.path.exists(path):
                os.replace(prev, path)                              # put the previous one back
            raise
        _fsync(parent, directory=True)
        shutil.rmtree(prev, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_folder(path):
    """If `path` is missing but `path.prev` exists (an atomic_folder save was interrupted between its two
    renames), move the previous version back into place; returns whether it did."""
    path, prev = os.path.abspath(path), os.path.abspath(path) + ".prev"
    if not os.path.exists(path) and os.path.isdir(prev):
        os.replace(prev, path)
        print(f"{path}: an interrupted save had left the previous version as {prev}; moved it back", file=sys.stderr)
        return True
    return False


@contextmanager
def saving(path):
    """Around a save to `path`: a failure (a full disk, a folder made read-only) becomes one OSError naming
    `path`. The save itself is atomic (atomic_folder), so the previous version at `path` is still whole and
    the half-written copy is already removed. (torch.save reports a full disk as a RuntimeError.)"""
    try:
        yield
    except (OSError, RuntimeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:100]
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise OSError(f"{path}: could not be written ({why}); {free / 2**20:.0f} MiB free there; any previous "
                      "version is kept") from None


# ----------------------------------------------------------------------------------------------------
# Resuming: the saved state and the flags it was made with


def read_state(path, device):
    """The dict of path/state.pt (train.save_checkpoint's), loaded with weights_only (no pickled code)."""
    fn = os.path.join(path, "state.pt")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file first
            warnings.simplefilter("ignore")
            state = torch.load(fn, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # not a torch.save file, or one holding objects other than tensors
        raise ValueError(f"--resume: {fn} is not a train.py checkpoint (weights_only refuses to unpickle it)") from None
    except Exception as e:  # a truncated zip and the like: each its own exception type
        why = str(e).strip().split(". ")[0][:100] or type(e).__name__
        raise ValueError(f"--resume: {fn} is not a readable checkpoint, cut short or damaged ({why})") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["a dict"]
    if missing:
        raise ValueError(f"--resume: {fn} is not a train.py checkpoint (it has no {missing[0]!r})")
    return state


def check_resume_args(saved, args, path):
    """Refuse to resume with flags that change the run (all but MAY_CHANGE), naming each and both values.
    Flags the checkpoint does not know (added to train.py since) are not compared."""
    changed = [(k, saved[k], v) for k, v in vars(args).items() if k in saved and k not in MAY_CHANGE and saved[k] != v]
    if changed:
        desc = ", ".join(f"{flag(k)} {old!r} -> {new!r}" for k, old, new in changed)
        raise ValueError(f"--resume: {path} was made with other settings ({desc}); resume with the saved values, "
                         f"or start again with --overwrite")


# ----------------------------------------------------------------------------------------------------
# Signals and non-finite values


@contextmanager
def sigterm_saves():
    """Inside the block SIGTERM (what schedulers, `kill` and `docker stop` send) raises KeyboardInterrupt,
    so train.py saves a checkpoint exactly as on Ctrl-C. Off the main thread (no signal handlers there) it
    changes nothing; the previous handler is restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class NonFinite(ValueError):
    """A NaN or inf in the loss, the gradient norm or the adapter weights: the run stops."""


def check_finite(step, loss=None, grad_norm=None, params=(), saved=""):
    """Raise NonFinite naming the (1-based) step when the loss, the gradient norm or any of `params` is
    NaN or inf; `saved` says which checkpoint is the last good one."""
    bad = [f"loss {float(loss)}"] if loss is not None and not torch.isfinite(torch.as_tensor(loss)) else []
    bad += [f"gradient norm {float(grad_norm)}"] if grad_norm is not None and not torch.isfinite(grad_norm) else []
    # max |w| over all tensors is finite exactly when every weight is (NaN propagates through the max)
    if params and not torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)):
        bad.append("adapter weights with NaN/inf")
    if bad:
        raise NonFinite(f"step {step}: {', '.join(bad)}; the run stopped and saved nothing from this step "
                        f"({saved}). Lower --lr, or check the data and the base weights")
