"""
sft.py: stage 3, supervised fine-tuning on curated conversations; only the assistant's tokens
carry loss.

The mixture is REFERENCE §7's late-2025 column (≈23K conversations at the real sizes): ARC-Easy
and ARC-Challenge train, GSM8K train, the first smoltalk_rows of SmolTalk train, the identity
conversations, and spelling_rows each of SimpleSpelling and SpellingBee; --mmlu_epochs adds that
many passes over MMLU auxiliary_train, as the reference's 2026 SFT does (3). Unlike pre- and
midtraining, each conversation gets a row of its own, right-padded to the longest row of its
micro-batch: inputs are padded with <|assistant_end|>, and targets are -1 at the pads and wherever
bpe's render_conversation mask is 0 (<|bos|>, user turns, <|assistant_start|>, tool outputs), so
the loss is the mean over what the assistant writes (--loss_per=conversation: the mean of each
row's mean, so a one-letter answer weighs as much as a worked solution). A conversation longer
than max_seq_len is cut by the renderer at a turn boundary; one left with no assistant token is
skipped (and counted), so no row, hence no micro-batch, is all-masked, and the loss can't be 0/0.
The learning rate is init_lr_frac of pretraining's, and decays linearly to 0 over the last
warmdown_frac of the run (1.0: from the start, as the reference's late-2025 SFT; 2026's: 0.5).

Your own conversations: --data=PATH, a JSONL file with one conversation per line (a list of
{role, content}, or {"messages": [...]}), added to the mixture (--data_mode=add) or used alone
(--data_mode=replace). The file is checked line by line before anything else happens; a bad line
stops the run with its line number, and no checkpoint or log is touched.

reads:  the latest checkpoint of --init_stage (mid, or base), the tokenizer, task data through
        gpt.fetch_hub / gpt.fetch_file (HF_ENDPOINT can point at a mirror)
writes: $SLIMCHAT_HOME/checkpoints/sft/<tag>/ (model, meta with loop and loader state, per-rank
        optimizer shards), $SLIMCHAT_HOME/logs/sft.jsonl (one JSON object per line)

cpu smoke: python sft.py --device=cpu --num_steps=4 --device_batch_size=2 --examples_per_step=4 --mc_problems=16
one gpu:   python sft.py
torchrun:  torchrun --standalone --nproc_per_node=8 sft.py
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
smoltalk_rows = 10000       # first rows of SmolTalk train in the mixture
spelling_rows = 300         # rows each of SimpleSpelling and SpellingBee
mmlu_epochs = 0             # passes over MMLU auxiliary_train added to the mixture (nanochat: 0, later 3)
# runtime
init_stage = "mid"          # stage whose latest checkpoint we start from: mid | base
model_tag = ""              # checkpoint tag to load and write; "" = the source's (d{n_layer})
device = ""                 # "" = autodetect (cuda > mps > cpu)
resume = 0                  # 1 = continue from the latest sft checkpoint (model, optimizer, loader)
preflight = 0               # 1 = check this run at full size without allocating it (meta device), print its plan, exit
gpu_memory_gib = -1.0       # memory of one GPU, for the preflight; -1 = the GPU's (80 without one)
# batch and horizon
max_seq_len = None          # longest row in tokens; None = inherit from the source checkpoint
device_batch_size = 4       # conversations per rank per micro-step
examples_per_step = 32      # conversations per optimizer step across all ranks; grad accumulation is derived
num_steps = -1              # optimizer steps; -1 = one epoch of the mixture
# optimizer and schedules (REFERENCE §7 E: pretraining's LRs x 0.02, linear decay to 0, no weight decay)
embedding_lr = 0.2          # AdamW, token embedding
unembedding_lr = 0.004      # AdamW, lm_head
matrix_lr = 0.02            # Muon, transformer matrices
init_lr_frac = 0.02         # multiplier on the three LRs above
warmdown_frac = 1.0         # fraction of the run at the end over which the LR decays linearly to 0
loss_per = "token"          # token: every assistant token weighs the same (nanochat); conversation: every row does
# evaluation and checkpoints
eval_every = 100            # steps between val bpb evals (assistant tokens of SmolTalk test); -1 = never (always at the last step)
eval_steps = 100            # val micro-batches per eval
mc_every = 200              # steps between MMLU and ARC-Easy accuracy evals; -1 = never (always at the last step)
mc_problems = 1024          # problems per task in that eval (the first ones of the test split)
save_every = -1             # steps between checkpoints; -1 = only at the end (and on Ctrl-C)
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# data: the mixture, your own conversations, and the padded one-conversation-per-row loader


def train_mixture(own, data_mode, smoltalk_rows, spelling_rows, mmlu_epochs=0):
    """REFERENCE §7's mixture, plus your conversations (`own`, a task or None), or them alone."""
    if data_mode not in ("add", "replace"):
        raise SystemExit(f"--data_mode={data_mode}: use add or replace")
    if data_mode == "replace":
        if own is None:
            raise SystemExit("--data_mode=replace needs --data=PATH")
        return evaluate.TaskMixture([own])
    tasks = [evaluate.ARC("ARC-Easy", "train"), evaluate.ARC("ARC-Challenge", "train"),
             evaluate.GSM8K("train"), evaluate.SmolTalk("train").first(smoltalk_rows),
             evaluate.CustomJSON(gpt.fetch_file("identity_conversations.jsonl")),
             evaluate.SimpleSpelling(spelling_rows, "train"), evaluate.SpellingBee(spelling_rows, "train")]
    tasks += [evaluate.MMLU("auxiliary_train")] * mmlu_epochs   # a task listed n times is seen n times
    return evaluate.TaskMixture(tasks + ([own] if own is not None else []))


def render_row(tok, conversation, max_seq_len):
    """(inputs, targets) of one conversation, targets -1 where the mask is 0; None if no target is left."""
    ids, mask = tok.render_conversation(conversation, max_tokens=max_seq_len + 1)
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    if all(t == -1 for t in targets):
        return None   # e.g. a first user turn longer than the row: the renderer kept no assistant turn
    return ids[:-1], targets


def pad_rows(rows, pad_id):
    """Right-pad (inputs, targets) rows to the longest: inputs with pad_id, targets with -1."""
    width = max(len(inputs) for inputs, _ in rows)
    x = torch.tensor([inputs + [pad_id] * (width - len(inputs)) for inputs, _ in rows], dtype=torch.long)
    y = torch.tensor([targets + [-1] * (width - len(targets)) for _, targets in rows], dtype=torch.long)
    return x, y   # (B, width) each


def sft_batches(dataset, tok, B, max_seq_len, rank=0, world=1, device="cpu", state=None):
    """Yield (inputs, targets, state) forever: (B, width <= max_seq_len) tensors on `device`, and the
    loader state just before this batch, from which sft_batches(..., state=state) yields it again.

    Rank r takes conversations r, r+world, ... (wrapping around the dataset, epoch after epoch).
    The state is {"cursor": global position of the next conversation, "skipped": conversations
    this rank skipped because nothing was left to train on}.
    """
    pad_id = tok.special("<|assistant_end|>")
    state = state or {"cursor": rank, "skipped": 0}
    cursor, skipped = state["cursor"], state["skipped"]
    while True:
        state, rows = {"cursor": cursor, "skipped": skipped}, []
        misses = 0   # conversations skipped since the last row
        while len(rows) < B:
            row = render_row(tok, dataset[cursor % len(dataset)], max_seq_len)
            cursor += world
            if row is None:
                skipped, misses = skipped + 1, misses + 1
                if misses > len(dataset):   # a whole epoch without one: there is nothing to train on
                    raise SystemExit(f"no conversation of the {len(dataset)} keeps an assistant token "
                                     f"within max_seq_len={max_seq_len}; raise it or shorten the data")
            else:
                rows.append(row)
                misses = 0
        x, y = pad_rows(rows, pad_id)
        yield x.to(device), y.to(device), state


def masked_loss(model, x, y, loss_per="token"):
    """Cross-entropy over the targets that are not -1 (the assistant's tokens): the mean over those
    tokens, or (loss_per="conversation") each row's mean, averaged over the rows."""
    if loss_per == "conversation":
        return (model(x, y, loss_reduction="none").sum(1) / (y >= 0).sum(1).clamp(min=1)).mean()
    return model(x, y, loss_reduction="sum") / (y >= 0).sum().clamp(min=1)

# ---------------------------------------------------------------------------
# schedules


def lr_multiplier(step, num_steps, warmdown_frac):
    """1 until the last warmdown_frac of the run, then linear to 0 (REFERENCE §7: E 1.0, H 0.5)."""
    progress = step / num_steps
    return min(1.0, (1.0 - progress) / warmdown_frac)


if __name__ == "__main__":
    config = gpt.apply_overrides(globals())
    gpt.check_stage(init_stage)
    if loss_per not in ("token", "conversation"):
        raise SystemExit(f"--loss_per={loss_per}: use token or conversation")
    if not 0 < warmdown_frac <= 1:
        raise SystemExit(f"--warmdown_frac={warmdown_frac}: use a fraction in (0, 1] "
                         "(1.0 decays from the first step)")

    # ------------------------------------------------------------------ setup
    own = evaluate.load_own_data(data) if data else None   # a bad line stops the run here, before any work
    ddp, rank, local_rank, world_size, dev, dtype, dtype_reason = gpt.compute_setup(device, preflight)
    master = rank == 0
    gpt.print0(f"device {dev} x {world_size} rank(s), dtype {dtype} ({dtype_reason}), git {gpt.git_info()}")
    tok = None if preflight else gpt.load_tokenizer()
    log_path = os.path.join(gpt.home(), "logs", "sft.jsonl")

    # ------------------------------------------------------------------ model
    source = "sft" if resume else init_stage
    if preflight:   # the checkpoint's meta gives the model; its weights stay on disk
        meta, optim_state = gpt.read_meta(source, model_tag or None), None
        model = gpt.new_model(gpt.GPTConfig(**meta["model_config"]), dev, dtype)
    else:
        model, meta, optim_state = gpt.load_checkpoint(source, dev, tag=model_tag or None, tokenizer=tok,
                                                       rank=rank, dtype=dtype)
    if not resume:
        optim_state = None   # the previous stage's moments belong to its data; start afresh
    tag = model_tag or f"d{model.config.n_layer}"
    gpt.print0(f"loaded {source} step {meta['step']}: model {model.config}, "
               f"{model.num_params()['total']:,} params")
    # no torch.compile: every micro-batch has its own width

    # ------------------------------------------------------------------ horizon and batch
    if max_seq_len is None:
        max_seq_len = config["max_seq_len"] = meta.get("max_seq_len", model.config.sequence_len)
        gpt.print0(f"inherited max_seq_len={max_seq_len} from the {source} checkpoint")
    assert max_seq_len <= model.config.sequence_len, (
        f"max_seq_len {max_seq_len} exceeds the model's sequence_len {model.config.sequence_len}")
    examples_per_micro_step = device_batch_size * world_size
    assert examples_per_step % examples_per_micro_step == 0, (
        f"examples_per_step {examples_per_step} is not a multiple of device_batch_size {device_batch_size} "
        f"x {world_size} ranks = {examples_per_micro_step}")
    grad_accum = examples_per_step // examples_per_micro_step
    if preflight:   # one training, eval and decode step at full size (rows padded to max_seq_len at worst)
        memory, memory_why = gpt.gpu_memory(gpu_memory_gib)
        line, too_big = gpt.preflight(model, device_batch_size, max_seq_len, world_size, memory,
                                      memory_why, compiled=False)
        print(f"preflight: {device_batch_size} rows of up to {max_seq_len} tokens per GPU; peak memory per GPU {line}")
        sys.exit(too_big)   # None: exit 0
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------ data
    train_set = train_mixture(own, data_mode, smoltalk_rows, spelling_rows, mmlu_epochs)
    val_set = evaluate.SmolTalk("test")
    mc_tasks = {"mmlu_acc": evaluate.MMLU("test"), "arc_easy_acc": evaluate.ARC("ARC-Easy", "test")}
    if num_steps == -1:
        num_steps = max(1, len(train_set) // examples_per_step)
    if resume and meta["num_steps"] != num_steps:
        raise SystemExit(f"--resume: the checkpoint's run has {meta['num_steps']} steps, these knobs "
                         f"give {num_steps}; the schedule must not change mid-run")
    if resume and meta["world_size"] != world_size:
        raise SystemExit(f"--resume: the checkpoint was written by {meta['world_size']} ranks, this run "
                         f"has {world_size}; the loader position is per rank")
    loader_state = meta["loop_state"]["loader"][rank] if resume else None
    train_loader = sft_batches(train_set, tok, device_batch_size, max_seq_len, rank, world_size, dev, loader_state)
    x, y, loader_state = next(train_loader)
    val_loader = sft_batches(val_set, tok, device_batch_size, max_seq_len, rank, world_size, dev)
    val_batches = [(vx, vy) for (vx, vy, _), _ in zip(val_loader, range(eval_steps))]
    gpt.print0(f"train conversations {len(train_set):,}: {grad_accum} micro-step(s) of "
               f"{examples_per_micro_step} per step, {num_steps} steps = "
               f"{num_steps * examples_per_step / len(train_set):.2f} epochs; val: {eval_steps} micro-batches")

    # ------------------------------------------------------------------ optimizer
    optimizer = model.setup_optimizer(embedding_lr * init_lr_frac, unembedding_lr * init_lr_frac,
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
                             "world_size": world_size, "num_steps": num_steps,
                             "train_conversations": len(train_set)})
    stop_signal = gpt.stop_requests()   # filled by Ctrl-C / SIGTERM; acted on at the top of the next step
    val_bpb, infer = None, None   # infer: the compute-dtype copy for the multiple-choice evals
    while True:
        last_step = step == num_steps
        stop = gpt.rank_max([len(stop_signal)], ddp, dev)[0] > 0   # every rank stops at the same step
        fresh = step > start_step or not resume   # a resumed run has already done step's evals and save

        if fresh and (last_step or (eval_every > 0 and step % eval_every == 0)):
            gpt.reset_peak_memory(dev)
            model.eval()
            val_bpb = evaluate.evaluate_bpb(model, val_batches, eval_steps, token_bytes)
            eval_mem = gpt.peak_memory_gib(dev)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            gpt.print0(f"step {step:05d} | val bpb {val_bpb:.4f}" + gpt.memory_text(eval_mem))
            if master:
                gpt.log_jsonl(log_path, {"step": step, "val_bpb": val_bpb, "eval_peak_mem_gib": eval_mem})
            model.train()
        if fresh and (last_step or (mc_every > 0 and step % mc_every == 0)):
            infer = gpt.inference_model(model, infer).eval()   # compute-dtype weights, refreshed in place
            engine = gpt.Engine(infer, tok)
            accuracy = {name: evaluate.run_chat_eval(task, infer, tok, engine, max_problems=mc_problems)
                        for name, task in mc_tasks.items()}
            model.train()
            gpt.print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
            if master:
                gpt.log_jsonl(log_path, {"step": step, **accuracy})
        if stop or (fresh and (last_step or (save_every > 0 and step % save_every == 0 and step > 0))):
            loader_states = gpt.rank_gather(loader_state, ddp)
            checkpoint_meta = {"val_bpb": val_bpb, "config": config, "tokenizer": tok.fingerprint(),
                               "world_size": world_size, "num_steps": num_steps,
                               "examples_per_step": examples_per_step, "max_seq_len": max_seq_len,
                               "device_batch_size": device_batch_size,
                               "loop_state": dict(loop, loader=loader_states)}
            where = gpt.save_checkpoint("sft", step, model, checkpoint_meta, optimizer, rank, tag)
            gpt.print0(f"saved step {step} to {where}")
        if last_step or stop:
            break

        # ------------------------------------------------------------------ one training step
        gpt.reset_peak_memory(dev)
        t0 = time.time()
        train_loss = torch.zeros((), device=dev)
        for micro_step in range(grad_accum):
            loss = masked_loss(model, x, y, loss_per)
            train_loss += loss.detach() / grad_accum
            (loss / grad_accum).backward()
            x, y, loader_state = next(train_loader)   # prefetch while the device works
        lrm = lr_multiplier(step, num_steps, warmdown_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
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
        if step - start_step > 10:   # the first steps warm up: not counted
            loop["training_time"] += dt
        gpt.print0(f"step {step:05d}/{num_steps:05d} ({100 * step / num_steps:.1f}%) | loss {loss_value:.4f} "
                   f"| lrm {lrm:.3f} | dt {dt * 1000:.1f}ms | skipped conversations {loader_state['skipped']}"
                   + gpt.memory_text(train_mem) + (" | update skipped: non-finite loss" if skipped else ""))
        if master:
            gpt.log_jsonl(log_path, {"step": step, "loss": loss_value, "lrm": lrm, "dt": dt, "skipped": skipped,
                                 "skipped_conversations": loader_state["skipped"], "train_peak_mem_gib": train_mem})

    # ------------------------------------------------------------------ done
    gpt.print0(f"done at step {step}: min val bpb {loop['min_val_bpb']:.4f}, "
               f"training time {loop['training_time'] / 60:.2f}m")
    gpt.compute_cleanup(stopped=not last_step)   # stopped by Ctrl-C/SIGTERM: exit status 75
