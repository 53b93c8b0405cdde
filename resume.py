"""resume.py: a run's checkpoint, and how --resume continues it bit for bit.

Each adapter's OUT/checkpoint holds its adapter files (loadable with --adapter-path) and state.pt: the
exact trainable tensors, the AdamW state, the step (the schedule and the data position are functions of
it), the best score so far, the torch / Python / CUDA random states, the flags, and whether the final
evaluation is done. train.py writes it at every evaluation, every --save-every steps, after every
--save-minutes of training, on Ctrl-C / SIGTERM and at the end; never of a non-finite adapter.

    resume.checkpoint(run, step)      # every adapter's OUT/checkpoint (rank 0), through guards.atomic_folder
    resume.restore(run)               # --resume: tensors, optimiser, step, RNG back; --overwrite: clear first

What --resume refuses (a changed flag, a foreign or truncated state.pt) is guards.py's; the guarantees are
README.md's "Reliability". Checked in test_all.py: an interrupted run resumed (after Ctrl-C, after SIGTERM,
with several adapters) gives the uninterrupted run's losses and weights (test_resume_equivalence,
test_multi_adapter_resume); a run killed in its final evaluation evaluates again and writes best/
(test_killed_during_the_final_evaluation_resumes_and_writes_best); checkpoints follow the --save-minutes
clock (test_save_minutes_writes_checkpoints_by_time).
"""
import os
import random
import time

import torch

import guards
from adapter_files import save_adapter


def save_checkpoint(path, t, step, finished=False):
    """Trainee t's checkpoint at `step`: adapter files (loadable with --adapter-path) + state.pt: exact
    trainable tensors, optimiser,
    step (the schedule is a function of it), data position, RNG states, and whether the final evaluation
    is done (a run killed during it evaluates again on --resume); one guards.atomic_folder, so the previous
    checkpoint stays whole until this one is in place."""
    model, args = t.model, t.args
    state = {"trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": t.opt.state_dict(), "step": step, "data_position": step * args.batch_size,
             "best": t.best, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
             "args": vars(args), "finished": finished}
    with guards.atomic_folder(path) as tmp:
        save_adapter(model, tmp, format=args.adapter_format)  # (itself atomic: it replaces the empty tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))


def checkpoint(run, step, finished=False):
    """OUT/checkpoint of every adapter at `step` (rank 0), what --resume continues from; never of a
    non-finite adapter."""
    check_adapters(run, step)
    if run.rank == 0:
        for t in run.adapters:
            with guards.saving(os.path.join(t.out, "checkpoint")):
                save_checkpoint(os.path.join(t.out, "checkpoint"), t, step, finished)
    run.saved_step, run.saved_at = step, time.time()


def restore(run):
    """---- 6. resume: for each adapter its trainable tensors, optimiser and best score; the step (= schedule
    and data position) and RNG; then open each OUT/log.jsonl (appended to, so a resumed run's log continues
    the interrupted one's)."""
    args, steps, done = run.args, {}, set()
    if args.overwrite and run.rank == 0:  # only now, when the new run has loaded and is about to write
        guards.clear(args.out)
    for t in run.adapters:
        os.makedirs(t.out, exist_ok=True)
        ckpt_dir = os.path.join(t.out, "checkpoint")
        if args.resume:
            guards.recover_folder(ckpt_dir)  # a save interrupted mid-swap left the previous one as checkpoint.prev
            path = ckpt_dir
            if not os.path.isfile(os.path.join(path, "state.pt")):
                raise FileNotFoundError(f"--resume: {ckpt_dir}/state.pt not found")
            state = guards.read_state(path, run.device)
            guards.check_resume_args(state["args"], t.args, path)
            try:
                unknown = t.model.load_state_dict(state["trainable"], strict=False).unexpected_keys
            except RuntimeError:  # a shape mismatch
                unknown = True
            if unknown or len(state["trainable"]) != len(t.params):
                raise ValueError(f"--resume: {path} holds a different adapter (check --adapter and its sizes)")
            t.opt.load_state_dict(state["optimizer"])
            t.best, steps[t.name] = state["best"], state["step"]
            done.add(state.get("finished", False))
            torch.set_rng_state(state["rng"]["torch"].cpu())
            random.setstate(state["rng"]["python"])
        t.log_file = open(os.path.join(t.out, "log.jsonl"), "a") if run.rank == 0 else None
    if args.resume:
        if len(set(steps.values())) > 1:
            raise ValueError(f"--resume: the adapters' checkpoints are at different steps ({steps})")
        run.start = run.saved_step = next(iter(steps.values()))
        run.finished = all(done)
        run.log(f"resumed from {args.out} at step {run.start}/{run.total_steps} (example {run.start * args.batch_size})")


def last_good(run):
    """Where the last good state is, for the message of a stopped run."""
    if run.saved_step is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint, in {run.args.out}, is at step {run.saved_step}"


def check_adapters(run, step):
    """Stop (guards.NonFinite) when an adapter holds a NaN/inf weight, before it is evaluated or saved."""
    for t in run.adapters:
        guards.check_finite(step if len(run.adapters) == 1 else f"{step} ({t.name})", params=t.params,
                            saved=last_good(run))
