"""
rl.py: reinforcement learning on GSM8K, starting from the latest SFT checkpoint.

Each step samples several answers per training question through gpt.Engine (one prefill, then
batched decoding with a KV cache, calculator tool calls included), grades them with
evaluate.py's GSM8K grader (reward 1.0 when the final "#### N" matches, else 0.0) and takes one
policy-gradient step. "GRPO" is in quotes because four parts of GRPO are dropped, which leaves
REINFORCE with a per-question baseline:
  1. no KL penalty and no reference model;
  2. on-policy (one update per batch of samples), so no PPO ratio and no clipping;
  3. token-level normalisation (DAPO): the loss is the sum of logp * advantage over every sampled
     token of a rank's rollouts, divided by that token count (not a per-sequence mean); ranks
     then average their gradients in the optimizer;
  4. advantage = reward - mean reward of the question's samples, without dividing by the std.
Only sampled tokens carry loss: the prompt and the calculator outputs the Engine forced into the
answer (mask 0) are masked. The learning rate decays linearly to 0. Every eval_every steps,
pass@1..k is measured on a slice of GSM8K test (k = eval_samples samples per question).

reads:  latest checkpoints/sft/<tag>/ and the tokenizer under $SLIMCHAT_HOME; GSM8K via the hub
writes: checkpoints/rl/<tag>/ (model, meta, per-rank optimizer shards), logs/rl.jsonl
Ctrl-C (SIGINT, or SIGTERM as sent by torchrun) saves a checkpoint at the end of the current
step and exits with status 75 (gpt.STOPPED_EXIT_CODE); --resume=1 continues from the latest rl checkpoint.

smoke: python rl.py --device=cpu --num_steps=4 --examples_per_step=2 --num_samples=4 --device_batch_size=4 --max_new_tokens=64 --eval_examples=8
one GPU: python rl.py
full:  torchrun --standalone --nproc_per_node=8 rl.py
"""
import math
import os
import time

import torch

import gpt
import evaluate

# ---------------------------------------------------------------------------
# hyperparameters: edit here, or override any of them with --name=value
# source and runtime
init_stage = "sft"         # stage whose latest checkpoint we start from
model_tag = ""             # checkpoint tag to load and write; "" = the default (d{n_layer})
device = ""                # "" = autodetect (cuda > mps > cpu)
resume = 0                 # 1 = continue from the latest rl checkpoint (model + optimizer)
seed = 0                   # base of the per-(step, question, pass) sampling seeds
# rollouts (REFERENCE §8: 16 questions x 16 samples, T=1.0, top-k 50, <= 256 new tokens)
examples_per_step = 16     # questions per step across all ranks; must divide by world size
num_samples = 16           # sampled answers per question (the group the baseline averages over)
device_batch_size = 8      # sequences per Engine call and per forward/backward pass
max_new_tokens = 256       # tokens sampled per answer at most
temperature = 1.0          # sampling temperature for rollouts and for pass@k
top_k = 50                 # sample among the top-k tokens; 0 = full softmax
# optimizer (the pretraining LRs, scaled down by init_lr_frac, linear decay to 0, no weight decay)
embedding_lr = 0.2         # AdamW, token embedding
unembedding_lr = 0.004     # AdamW, lm_head
matrix_lr = 0.02           # Muon, transformer matrices
init_lr_frac = 0.05        # RL starts at 5% of the pretraining LRs
num_steps = -1             # -1 = one epoch of GSM8K train (len(train) // examples_per_step)
# eval, logging, saving
eval_every = 60            # steps between pass@k evals on GSM8K test; -1 = never
eval_examples = 400        # test questions in the eval slice (the first ones)
eval_samples = 8           # samples per test question; pass@1..eval_samples is logged
save_every = 60            # steps between checkpoints; -1 = only at the end (and on Ctrl-C)
# ---------------------------------------------------------------------------


def reward(task, conversation, completion):
    """1.0 if the task's grader accepts the completion text, else 0.0 (GSM8K: the #### number)."""
    return float(task.evaluate(conversation, completion))


def group_advantages(rewards):
    """rewards [Q, S] (S samples of each of Q questions) -> reward minus its question's mean."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def pass_at_k(n, c, k):
    """Unbiased chance that at least one of k draws (of n samples, c correct) is correct.

    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, the Codex paper), written as a product so it
    never forms huge binomials. With k = n it is "any sample correct"; with k = 1 it is c / n.
    """
    assert 0 <= c <= n and 1 <= k <= n, f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}"
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def step_questions(step, examples_per_step, rank, world_size, num_questions):
    """Indices of the training questions this rank answers at `step`: a rank-strided cursor over
    the dataset that depends only on step, so a resumed run picks up exactly where it stopped."""
    first = step * examples_per_step
    return [(first + j) % num_questions for j in range(rank, examples_per_step, world_size)]


def sample_seed(*parts):
    """A deterministic 31-bit seed per (seed, step, question, pass): hashing a tuple of ints does
    not depend on PYTHONHASHSEED, so every run and every rank draws the same samples."""
    return hash(parts) & 0x7FFFFFFF


def rollout_batch(sequences, masks, pad_id, device):
    """Right-pad token lists into (inputs, targets) [B, T-1] for next-token prediction.

    A target is -1 (no loss) unless its token was sampled by the policy (Engine mask 1): that
    drops the prompt, the forced calculator outputs and the padding.
    """
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    sampled = torch.zeros((len(sequences), T), dtype=torch.bool)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        assert len(seq) == len(mask), f"sequence {i}: {len(seq)} tokens but {len(mask)} mask entries"
        ids[i, :len(seq)] = torch.tensor(seq)
        sampled[i, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~sampled[:, 1:], -1)
    return ids[:, :-1].to(device), targets.to(device)


def policy_gradient_loss(logp, targets, advantages, num_tokens):
    """-(sum of logp * advantage over sampled tokens) / num_tokens.

    logp [B, T] log-probabilities of the targets, targets [B, T] (-1 = not sampled),
    advantages [B] one per sequence, num_tokens the sampled-token count that normalises
    (all of the step's rollouts on this rank, not just this batch: DAPO normalisation).
    """
    sampled = (targets >= 0).to(logp.dtype)
    return -(logp * sampled * advantages[:, None]).sum() / max(num_tokens, 1)


def generate(engine, tokenizer, prompt, count, seed, max_tokens, temperature, top_k):
    """`count` sampled answers to one prompt through the Engine: (sequences, masks, texts)."""
    sequences, masks = engine.generate_batch(prompt, num_samples=count, max_tokens=max_tokens,
                                             temperature=temperature, top_k=top_k or None, seed=seed)
    texts = [tokenizer.decode(s[len(prompt):]) for s in sequences]
    return sequences, masks, texts


def evaluate_pass_at_k(task, engine, tokenizer, indices, num_draws, sampling, seed, device, ddp):
    """pass@1..num_draws averaged over the test questions `indices` (this rank's share); the sums
    are reduced over ranks, so every rank gets the same list of floats."""
    sums = [0.0] * (num_draws + 1)   # pass@1..k, then the question count
    for idx in indices:
        conversation = task[idx]
        prompt = tokenizer.render_for_completion(conversation)
        _, _, texts = generate(engine, tokenizer, prompt, num_draws, sample_seed(seed, -1, idx), *sampling)
        c = sum(int(reward(task, conversation, t) > 0) for t in texts)
        for k in range(1, num_draws + 1):
            sums[k - 1] += pass_at_k(num_draws, c, k)
        sums[-1] += 1
    sums = gpt.rank_sum(sums, ddp, device)
    return [s / max(sums[-1], 1) for s in sums[:-1]]


if __name__ == "__main__":
    config = gpt.apply_overrides(globals())

    # -----------------------------------------------------------------------
    # setup
    ddp, rank, local_rank, world_size, device, dtype, dtype_reason = gpt.compute_setup(device)
    gpt.print0(f"device {device}, dtype {dtype} ({dtype_reason}), world size {world_size}, git {gpt.git_info()}")
    tag = model_tag or None
    if examples_per_step % world_size:
        raise SystemExit(f"examples_per_step={examples_per_step} must be a multiple of the world size "
                         f"{world_size}: every rank answers the same number of questions")
    if num_samples % device_batch_size:
        raise SystemExit(f"num_samples={num_samples} must be a multiple of device_batch_size="
                         f"{device_batch_size}: samples are drawn device_batch_size at a time")
    if resume and gpt.latest_step("rl", tag=tag) is None:
        raise SystemExit(f"--resume=1 but there is no rl checkpoint under {gpt.home()}/checkpoints/rl; "
                         f"run without --resume first")
    gpt.check_stage(init_stage)
    if not resume:   # the starting checkpoint must exist before GSM8K is downloaded
        try:
            gpt.require_checkpoint(init_stage, tag)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    tokenizer = gpt.load_tokenizer()
    log_path = os.path.join(gpt.home(), "logs", "rl.jsonl")
    stop_signal = gpt.stop_requests()   # filled by Ctrl-C / SIGTERM; acted on at the top of the next step

    # -----------------------------------------------------------------------
    # data
    train_task, test_task = evaluate.GSM8K("train"), evaluate.GSM8K("test")
    if num_steps == -1:
        num_steps = len(train_task) // examples_per_step
    if num_steps < 1:
        raise SystemExit(f"num_steps={num_steps}: need at least one step (GSM8K train has "
                         f"{len(train_task)} questions, examples_per_step={examples_per_step})")
    eval_indices = list(range(rank, min(eval_examples, len(test_task)), world_size))
    passes = num_samples // device_batch_size
    gpt.print0(f"GSM8K train {len(train_task):,} / test {len(test_task):,} questions; {num_steps} steps of "
               f"{examples_per_step} questions x {num_samples} samples; {examples_per_step // world_size} "
               f"questions x {passes} passes of {device_batch_size} per rank")

    # -----------------------------------------------------------------------
    # model
    source = "rl" if resume else init_stage
    model, meta, optim_state = gpt.load_checkpoint(source, device, tag=tag, tokenizer=tokenizer,
                                                   rank=rank, dtype=dtype)
    start_step = meta["step"] if resume else 0
    gpt.print0(f"starting from the {source} checkpoint at step {meta['step']}; "
               f"parameters: {model.num_params()['total']:,}")
    policy = gpt.inference_model(model)   # rollouts' weights in the compute dtype, refreshed after each step
    engine = gpt.Engine(policy, tokenizer)
    pad_id = tokenizer.special("<|assistant_end|>")   # padding is never a target
    if rank == 0:
        gpt.rewind_log(log_path, start_step if resume else None)   # step start_step is redone
        gpt.log_jsonl(log_path, {"event": "start", "step": start_step, "config": config, "git": gpt.git_info(),
                             "world_size": world_size, "num_steps": num_steps, "source": source,
                             "source_step": meta["step"]})

    # -----------------------------------------------------------------------
    # optimizer
    optimizer = model.setup_optimizer(embedding_lr=embedding_lr * init_lr_frac,
                                      unembedding_lr=unembedding_lr * init_lr_frac,
                                      matrix_lr=matrix_lr * init_lr_frac, weight_decay=0.0)
    if resume:
        assert optim_state is not None, f"the rl checkpoint at step {start_step} has no optimizer shard for rank {rank}"
        optimizer.load_state_dict(optim_state)

    # -----------------------------------------------------------------------
    # schedules
    def get_lr_multiplier(it):
        return 1.0 - it / num_steps  # §8: linear decay to 0; no momentum schedule

    # -----------------------------------------------------------------------
    # loop
    sampling = (max_new_tokens, temperature, top_k)
    pass_k = None
    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps
        stop = gpt.rank_max([len(stop_signal)], ddp, device)[0] > 0   # every rank stops at the same step
        if eval_every > 0 and (step % eval_every == 0 or last_step):
            gpt.reset_peak_memory(device)
            pass_k = evaluate_pass_at_k(test_task, engine, tokenizer, eval_indices, eval_samples,
                                        sampling, seed, device, ddp)
            eval_mem = gpt.peak_memory_gib(device)
            gpt.print0(f"step {step:05d} | " + " ".join(f"pass@{k} {p:.4f}" for k, p in enumerate(pass_k, 1))
                       + gpt.memory_text(eval_mem))
            if rank == 0:
                gpt.log_jsonl(log_path, {"step": step, **{f"pass@{k}": p for k, p in enumerate(pass_k, 1)},
                                         "eval_peak_mem_gib": eval_mem})

        # -------------------------------------------------------------------
        # save
        if step > start_step and (last_step or stop or (save_every > 0 and step % save_every == 0)):
            gpt.save_checkpoint("rl", step, model, {"config": config, "tokenizer": tokenizer.fingerprint(),
                                                    "loop": {"step": step}, "pass_at_k": pass_k},
                                optimizer=optimizer, rank=rank, tag=tag)
            gpt.print0(f"saved rl checkpoint at step {step}")
        if last_step or stop:
            break

        # -------------------------------------------------------------------
        # rollouts: num_samples answers to each of this rank's questions, graded
        gpt.reset_peak_memory(device)
        t0 = time.time()
        rollouts, rewards, gen_tokens = [], [], 0   # rollouts: (sequences, masks) per pass
        for idx in step_questions(step, examples_per_step, rank, world_size, len(train_task)):
            conversation = train_task[idx]
            prompt = tokenizer.render_for_completion(conversation)
            for p in range(passes):
                seqs, masks, texts = generate(engine, tokenizer, prompt, device_batch_size,
                                              sample_seed(seed, step, idx, p), *sampling)
                rollouts.append((seqs, masks))
                rewards.extend(reward(train_task, conversation, t) for t in texts)
                gen_tokens += sum(len(s) - len(prompt) for s in seqs)
        rewards = torch.tensor(rewards).view(-1, num_samples)                  # (Q, S)
        advantages = group_advantages(rewards).view(-1, device_batch_size)    # (Q * passes, B)
        num_tokens = sum(sum(m[1:]) for _, masks in rollouts for m in masks)  # DAPO normaliser

        # -------------------------------------------------------------------
        # one optimizer step: a forward/backward per pass, gradients accumulate
        for (seqs, masks), adv in zip(rollouts, advantages):
            if not adv.any():
                continue  # all advantages 0 (the samples all scored the same): no gradient to add
            inputs, targets = rollout_batch(seqs, masks, pad_id, device)
            nll = model(inputs, targets, loss_reduction="none")   # (B, T), 0 where the target is -1
            policy_gradient_loss(-nll, targets, adv.to(device), num_tokens).backward()
        lrm = get_lr_multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        optimizer.step()   # averages the gradients over ranks
        optimizer.zero_grad(set_to_none=True)
        gpt.inference_model(model, policy)   # the next rollouts sample from the new weights
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        train_mem = gpt.peak_memory_gib(device)

        # log: mean reward and sample length over every rank's samples
        reward_sum, count, token_sum = gpt.rank_sum([rewards.sum().item(), rewards.numel(), gen_tokens],
                                                    ddp, device)
        gpt.print0(f"step {step:05d}/{num_steps} | reward {reward_sum / count:.4f} | sample len "
                   f"{token_sum / count:.1f} | lrm {lrm:.3f} | dt {dt:.2f}s" + gpt.memory_text(train_mem))
        if rank == 0:
            gpt.log_jsonl(log_path, {"step": step, "reward": reward_sum / count, "sample_len": token_sum / count,
                                 "lrm": lrm, "dt": dt, "train_peak_mem_gib": train_mem})

    gpt.compute_cleanup(stopped=not last_step)   # stopped by Ctrl-C/SIGTERM: exit status 75
