"""
midtrain.py: stage 2, teach the base model conversations, tool use and multiple choice.

One pass over the task mixture of REFERENCE §6, shuffled once by evaluate.TaskMixture: SmolTalk
train, MMLU auxiliary_train, GSM8K train (its calculator steps become python tool calls), the
identity conversations twice, SimpleSpelling and SpellingBee. Each conversation is rendered by
bpe's render_conversation and the rows are packed like pretraining's (REFERENCE §2.2 H, the loader
the reference moved its midtraining to): every row starts with a conversation's <|bos|>, the largest
buffered conversation that fits the space left goes in next, and when none fits the shortest one is
cropped to fill the row, so nothing is padded. Every token carries loss, as in the reference
midtraining: the model still has to learn the whole chat format, user turns included, and dense rows
give it the most signal per step; sft.py then trains on the assistant's tokens only. Conversations
longer than a row are cut by the renderer at a turn boundary, so no row can be all-masked or NaN.
The learning rate is constant, then decays linearly to 0 over the last warmdown_frac of the pass.

Your own conversations: --data=PATH, a JSONL file with one conversation per line (a list of
{role, content}, or {"messages": [...]}), added to the mixture (--data_mode=add) or used alone
(--data_mode=replace). The file is checked line by line before anything else happens; a bad line
stops the run with its line number, and no checkpoint or log is touched.

reads:  the latest base checkpoint (its meta gives the default row length and batch sizes), the
        tokenizer, task data through gpt.fetch_hub / gpt.fetch_file (HF_ENDPOINT can be a mirror)
writes: $SLIMCHAT_HOME/checkpoints/mid/<tag>/ (model, meta with loop and loader state, per-rank
        optimizer shards), $SLIMCHAT_HOME/logs/mid.jsonl (one JSON object per line)

cpu smoke: python midtrain.py --device=cpu --num_steps=4 --device_batch_size=2 --total_batch_size=256 --max_seq_len=128
one gpu:   python midtrain.py
torchrun:  torchrun --standalone --nproc_per_node=8 midtrain.py
"""
import os
import sys
import time

import torch

import evaluate
import gpt

# ---------------------------------------------------------------------------
# hyperparameters: edit here, or override any of them with --name=value
# data
data = ""                   # JSONL file of your own conversations; "" = none
data_mode = "add"           # add: mixed into the task mixture; replace: your data alone
simple_spelling_rows = 200000  # SimpleSpelling train rows in the mixture
spelling_bee_rows = 80000   # SpellingBee train rows in the mixture
buffer_size = 1000          # conversations per rank the best-fit packer chooses from
# runtime
model_tag = ""              # checkpoint tag to load and write; "" = the base's (d{n_layer})
device = ""                 # "" = autodetect (cuda > mps > cpu)
resume = 0                  # 1 = continue from the latest mid checkpoint (model, optimizer, loader)
use_compile = 1             # torch.compile the model on cuda (ignored on other devices)
preflight = 0               # 1 = check this run at full size without allocating it (meta device), print its plan, exit
gpu_memory_gib = -1.0       # memory of one GPU, for the preflight; -1 = the GPU's (80 without one)
# batch and horizon
max_seq_len = None          # tokens per row; None = inherit from the base checkpoint
device_batch_size = None    # rows per rank per micro-step; None = inherit
total_batch_size = None     # tokens per optimizer step across all ranks (grad accumulation is derived); None = inherit
num_steps = -1              # optimizer steps; -1 = one pass over the mixture
# optimizer and schedules (REFERENCE §6: the pretraining LRs, no weight decay)
embedding_lr = 0.2          # AdamW, token embedding
unembedding_lr = 0.004      # AdamW, lm_head
matrix_lr = 0.02            # Muon, transformer matrices
init_lr_frac = 1.0          # multiplier on the three LRs above
warmdown_frac = 0.2         # fraction of the pass at the end over which the LR decays linearly to 0
# evaluation and checkpoints
eval_every = 150            # steps between val bpb evals on the held-out mixture; -1 = never (always at the last step)
eval_tokens = 20 * 524288   # val tokens per eval, across all ranks
save_every = -1             # steps between checkpoints; -1 = only at the end (and on Ctrl-C)
# ---------------------------------------------------------------------------

# the held-out mixture (REFERENCE §6): SmolTalk test plus the first rows of MMLU test and GSM8K test
VAL_MMLU_ROWS, VAL_GSM8K_ROWS = 5200, 420

# ---------------------------------------------------------------------------
# data: the mixtures, your own conversations, and the best-fit packed loader


def train_mixture(own, data_mode, simple_spelling_rows, spelling_bee_rows):
    """REFERENCE §6's mixture, plus your conversations (`own`, a task or None), or them alone."""
    if data_mode not in ("add", "replace"):
        raise SystemExit(f"--data_mode={data_mode}: use add or replace")
    if data_mode == "replace":
        if own is None:
            raise SystemExit("--data_mode=replace needs --data=PATH")
        return evaluate.TaskMixture([own])
    identity = evaluate.CustomJSON(gpt.fetch_file("identity_conversations.jsonl"))
    tasks = [evaluate.SmolTalk("train"), evaluate.MMLU("auxiliary_train"), evaluate.GSM8K("train"),
             identity, identity,   # listed twice: two epochs of who the model is
             evaluate.SimpleSpelling(simple_spelling_rows, "train"),
             evaluate.SpellingBee(spelling_bee_rows, "train")]
    return evaluate.TaskMixture(tasks + ([own] if own is not None else []))


def val_mixture():
    return evaluate.TaskMixture([evaluate.SmolTalk("test"), evaluate.MMLU("test").first(VAL_MMLU_ROWS),
                                 evaluate.GSM8K("test").first(VAL_GSM8K_ROWS)])


def take_best_fit(buffer, room):
    """Pop from `buffer` (a list of (index, ids)) the ids that go next into a row with `room` left:
    the largest conversation that fits, else the shortest one cropped to `room` (its tail is lost)."""
    fits = [k for k, (_, ids) in enumerate(buffer) if len(ids) <= room]
    if fits:
        return buffer.pop(max(fits, key=lambda k: len(buffer[k][1])))[1]
    return buffer.pop(min(range(len(buffer)), key=lambda k: len(buffer[k][1])))[1][:room]


def packed_batches(dataset, tok, B, T, rank=0, world=1, device="cpu", state=None, buffer_size=1000):
    """Yield (inputs, targets, state) forever: (B, T) int64 tensors on `device`, and the loader
    state just before this batch, from which packed_batches(..., state=state) yields it again.

    Rank r takes conversations r, r+world, ... (wrapping around the dataset, epoch after epoch).
    The state is {"cursor": global position of the next conversation to fetch, "buffer": the
    buffered conversations' positions in arrival order}: resuming renders exactly those again.
    """
    assert buffer_size >= 1, f"buffer_size must be at least 1, got {buffer_size}"

    def render(position):
        ids, _ = tok.render_conversation(dataset[position % len(dataset)], max_tokens=T + 1)
        return ids   # the mask is not used: midtraining trains on every token (see the docstring)

    state = state or {"cursor": rank, "buffer": []}
    cursor, buffer = state["cursor"], [(p, render(p)) for p in state["buffer"]]
    while True:
        state = {"cursor": cursor, "buffer": [p for p, _ in buffer]}
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.append((cursor, render(cursor)))
                    cursor += world
                row += take_best_fit(buffer, T + 1 - len(row))
            rows.append(row)
        batch = torch.tensor(rows, dtype=torch.long)   # (B, T+1)
        yield batch[:, :-1].to(device), batch[:, 1:].to(device), state


def pass_progress(state, world, dataset_size):
    """Fraction of the mixture trained on: positions fetched, minus those still in the buffer."""
    return (state["cursor"] - world * len(state["buffer"])) / dataset_size

# ---------------------------------------------------------------------------
# schedules


def lr_multiplier(progress, warmdown_frac):
    """Constant, then linear to 0 over the last warmdown_frac of the pass (REFERENCE §6)."""
    return 1.0 if progress < 1 - warmdown_frac else max(0.0, (1 - progress) / warmdown_frac)


def muon_momentum(step):
    """0.85 -> 0.95 over the first 300 steps (REFERENCE §6, as in pretraining)."""
    return 0.85 + 0.10 * min(step / 300, 1.0)


if __name__ == "__main__":
    config = gpt.apply_overrides(globals())

    # ------------------------------------------------------------------ setup
    own = evaluate.load_own_data(data) if data else None   # a bad line stops the run here, before any work
    ddp, rank, local_rank, world_size, dev, dtype, dtype_reason = gpt.compute_setup(device, preflight)
    master = rank == 0
    gpt.print0(f"device {dev} x {world_size} rank(s), dtype {dtype} ({dtype_reason}), git {gpt.git_info()}")
    tok = None if preflight else gpt.load_tokenizer()
    log_path = os.path.join(gpt.home(), "logs", "mid.jsonl")

    # ------------------------------------------------------------------ model
    source = "mid" if resume else "base"
    if preflight:   # the checkpoint's meta gives the model; its weights stay on disk
        meta, optim_state = gpt.read_meta(source, model_tag or None), None
        raw_model = gpt.new_model(gpt.GPTConfig(**meta["model_config"]), dev, dtype)
    else:
        raw_model, meta, optim_state = gpt.load_checkpoint(source, dev, tag=model_tag or None, tokenizer=tok,
                                                           rank=rank, dtype=dtype)
    if not resume:
        optim_state = None   # the base optimizer's moments belong to pretraining's data; start afresh
    model = torch.compile(raw_model, dynamic=False) if use_compile and dev.type == "cuda" else raw_model
    tag = model_tag or f"d{raw_model.config.n_layer}"
    gpt.print0(f"loaded {source} step {meta['step']}: model {raw_model.config}, "
               f"{raw_model.num_params()['total']:,} params")

    # ------------------------------------------------------------------ horizon and batch
    meta.setdefault("max_seq_len", raw_model.config.sequence_len)
    for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
        if config[name] is None:
            if name not in meta:   # an imported model (hf.py import) was not trained here
                raise SystemExit(f"the {source} checkpoint has no {name} to inherit (an imported model?): "
                                 f"pass --{name}=N")
            config[name] = meta[name]
            gpt.print0(f"inherited {name}={meta[name]} from the {source} checkpoint")
    max_seq_len, device_batch_size, total_batch_size = (
        config["max_seq_len"], config["device_batch_size"], config["total_batch_size"])
    assert max_seq_len <= raw_model.config.sequence_len, (
        f"max_seq_len {max_seq_len} exceeds the model's sequence_len {raw_model.config.sequence_len}")
    tokens_per_micro_step = device_batch_size * max_seq_len * world_size
    assert total_batch_size % tokens_per_micro_step == 0, (
        f"total_batch_size {total_batch_size} is not a multiple of device_batch_size {device_batch_size} "
        f"x max_seq_len {max_seq_len} x {world_size} ranks = {tokens_per_micro_step}")
    grad_accum = total_batch_size // tokens_per_micro_step
    if resume and meta["num_steps"] != num_steps:
        raise SystemExit(f"--resume: the checkpoint's run has num_steps={meta['num_steps']}, this one "
                         f"{num_steps}; the schedule must not change mid-run")
    gpt.print0(f"{grad_accum} micro-step(s) of {tokens_per_micro_step:,} tokens per step; horizon "
               + (f"{num_steps} steps" if num_steps > 0 else "one pass over the mixture"))
    if preflight:   # one training, eval and decode step at full size, and the memory they need
        memory, memory_why = gpt.gpu_memory(gpu_memory_gib)
        line, too_big = gpt.preflight(raw_model, device_batch_size, max_seq_len, world_size, memory,
                                      memory_why, compiled=bool(use_compile))
        print(f"preflight: {device_batch_size} rows x {max_seq_len} tokens per GPU; peak memory per GPU {line}")
        sys.exit(too_big)   # None: exit 0
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------ data
    train_set = train_mixture(own, data_mode, simple_spelling_rows, spelling_bee_rows)
    val_set = val_mixture()
    if resume and meta["world_size"] != world_size:
        raise SystemExit(f"--resume: the checkpoint was written by {meta['world_size']} ranks, this run "
                         f"has {world_size}; the loader position is per rank")
    loader_state = meta["loop_state"]["loader"][rank] if resume else None
    train_loader = packed_batches(train_set, tok, device_batch_size, max_seq_len, rank, world_size, dev,
                                  loader_state, buffer_size)
    x, y, loader_state = next(train_loader)
    eval_steps = eval_tokens // tokens_per_micro_step
    assert eval_steps > 0, f"eval_tokens {eval_tokens} is less than one micro-step ({tokens_per_micro_step} tokens)"
    val_loader = packed_batches(val_set, tok, device_batch_size, max_seq_len, rank, world_size, dev,
                                None, buffer_size)
    val_batches = [(vx, vy) for (vx, vy, _), _ in zip(val_loader, range(eval_steps))]
    gpt.print0(f"train conversations {len(train_set):,}, val conversations {len(val_set):,} "
               f"({eval_steps * tokens_per_micro_step:,} val tokens, fixed)")

    # ------------------------------------------------------------------ optimizer
    optimizer = raw_model.setup_optimizer(embedding_lr * init_lr_frac, unembedding_lr * init_lr_frac,
                                          matrix_lr * init_lr_frac, weight_decay=0.0)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)

    # ------------------------------------------------------------------ loop
    loop = meta["loop_state"] if resume else {"min_val_bpb": float("inf"), "training_time": 0.0}
    step = start_step = meta["step"] if resume else 0
    if master:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        if not resume:
            open(log_path, "w").close()   # a fresh run starts a fresh log; a resumed one appends
        gpt.log_jsonl(log_path, {"event": "start", "step": step, "config": config, "git": gpt.git_info(),
                             "world_size": world_size, "train_conversations": len(train_set)})
    stop_signal = gpt.stop_requests()   # filled by Ctrl-C / SIGTERM; acted on at the top of the next step
    val_bpb = None
    while True:
        # every rank agrees on the progress and on a Ctrl-C, so they all stop (and save) together
        progress, stop = gpt.rank_max([pass_progress(loader_state, world_size, len(train_set)), len(stop_signal)],
                                  ddp, dev)
        progress = step / num_steps if num_steps > 0 else progress
        last_step, stop = progress >= 1, stop > 0
        fresh = step > start_step or not resume   # a resumed run has already done step's evals and save

        if fresh and (last_step or (eval_every > 0 and step % eval_every == 0)):
            gpt.reset_peak_memory(dev)
            model.eval()
            val_bpb = evaluate.evaluate_bpb(model, val_batches, eval_steps, token_bytes)
            model.train()
            eval_mem = gpt.peak_memory_gib(dev)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            gpt.print0(f"step {step:05d} | val bpb {val_bpb:.4f}" + gpt.memory_text(eval_mem))
            if master:
                gpt.log_jsonl(log_path, {"step": step, "val_bpb": val_bpb, "eval_peak_mem_gib": eval_mem})
        if stop or (fresh and (last_step or (save_every > 0 and step % save_every == 0 and step > 0))):
            loader_states = gpt.rank_gather(loader_state, ddp)
            checkpoint_meta = {"val_bpb": val_bpb, "config": config, "tokenizer": tok.fingerprint(),
                               "world_size": world_size, "num_steps": num_steps,
                               "total_batch_size": total_batch_size, "max_seq_len": max_seq_len,
                               "device_batch_size": device_batch_size,
                               "loop_state": dict(loop, loader=loader_states)}
            where = gpt.save_checkpoint("mid", step, raw_model, checkpoint_meta, optimizer, rank, tag)
            gpt.print0(f"saved step {step} to {where}")
        if last_step or stop:
            break

        # ------------------------------------------------------------------ one training step
        gpt.reset_peak_memory(dev)
        t0 = time.time()
        train_loss = torch.zeros((), device=dev)
        for micro_step in range(grad_accum):
            loss = model(x, y)
            train_loss += loss.detach() / grad_accum
            (loss / grad_accum).backward()
            x, y, loader_state = next(train_loader)   # prefetch while the device works
        lrm = lr_multiplier(progress, warmdown_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        # a non-finite loss on any rank skips the update on every rank, so the ranks stay identical
        loss_value = train_loss.item()
        skipped = gpt.rank_max([not torch.isfinite(train_loss).item()], ddp, dev)[0] > 0
        if not skipped:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.time() - t0
        train_mem = gpt.peak_memory_gib(dev)
        step += 1

        # ------------------------------------------------------------------ log
        if step - start_step > 10:   # the first steps compile and warm up: not counted
            loop["training_time"] += dt
        gpt.print0(f"step {step:05d} ({100 * progress:.1f}% of the pass) | loss {loss_value:.4f} | lrm {lrm:.3f} "
                   f"| dt {dt * 1000:.1f}ms | tok/s {total_batch_size / dt:,.0f}"
                   + gpt.memory_text(train_mem) + (" | update skipped: non-finite loss" if skipped else ""))
        if master:
            gpt.log_jsonl(log_path, {"step": step, "loss": loss_value, "progress": progress, "lrm": lrm,
                                 "dt": dt, "tok_per_sec": total_batch_size / dt, "skipped": skipped,
                                 "train_peak_mem_gib": train_mem})

    # ------------------------------------------------------------------ done
    gpt.print0(f"done at step {step}: min val bpb {loop['min_val_bpb']:.4f}, "
               f"training time {loop['training_time'] / 60:.2f}m")
    gpt.compute_cleanup(stopped=not last_step)   # stopped by Ctrl-C/SIGTERM: exit status 75
