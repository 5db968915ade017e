#!/usr/bin/env bash
# slimchat: the whole pipeline in one script.
#   bash run_all.sh          speedrun preset: one 8xH100 node, a few hours
#   bash run_all.sh tiny     the same stages, shrunk, on CPU against the offline mirror
#   bash run_all.sh test     install everything the tests need, then run pytest
#   bash run_all.sh gpucheck the GPU acceptance run: <= 10 minutes on one GPU, no network
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-speedrun}"

# ---------------------------------------------------------------------------
# environment: create or reuse .venv, install what requirements*.txt declare.
# A stamp of the requirement files' hash skips pip entirely when nothing changed.
setup_venv() {
    local reqs="$1"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    local stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename "$reqs")"
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -r "$reqs"
        touch "$stamp"
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
}

# The browser test drives Debian's Chromium; install it when we are root and it is missing.
install_browser() {
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
                || echo "warning: could not install chromium; the browser test will be skipped"
        fi
    fi
}

# ---------------------------------------------------------------------------
# pipeline plumbing
# Each finished step leaves a stamp in $SLIMCHAT_HOME/run_all/, so re-running the script after a
# crash skips what is done; a training stage that crashed mid-way resumes from its last checkpoint.
step() {
    local name="$1"; shift
    local stamp="$SLIMCHAT_HOME/run_all/$name.done"
    if [ -f "$stamp" ]; then echo "== $name: done already (delete $stamp to redo it)"; return; fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    mkdir -p "$SLIMCHAT_HOME/run_all" && touch "$stamp"
    echo "== $name: finished in $((SECONDS - t0)) s"
}

# --resume=1 when the stage already wrote a checkpoint (a crashed earlier attempt), else nothing
resume_flag() {
    python -c "import gpt, sys; sys.exit(0 if gpt.latest_step('$1') is not None else 1)" 2>/dev/null \
        && echo "--resume=1" || true
}

# Training stages run under torchrun on GPUs (one process per GPU, NNODES nodes), plain python on CPU.
launch() {
    if [ "$NPROC" -le 1 ] && [ "$NNODES" -le 1 ]; then
        python "$@"
    elif [ "$NNODES" -le 1 ]; then
        torchrun --standalone --nproc_per_node="$NPROC" "$@"
    else  # multi-node: run this script on every node with the same MASTER_ADDR and its own NODE_RANK
        torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
            --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" "$@"
    fi
}

case "$preset" in
test)
    setup_venv requirements-test.txt
    install_browser
    python -m pytest -q "${@:2}"
    ;;

speedrun)
    # One 8xH100 node, about four hours (REFERENCE.md §12.2: the d20 run of the reference).
    setup_venv requirements.txt
    export OMP_NUM_THREADS=1
    export SLIMCHAT_HOME="${SLIMCHAT_HOME:-$HOME/.cache/slimchat}"
    DEPTH="${DEPTH:-20}"                 # the one dial: width 64*DEPTH, horizon 20 tokens/param
    NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"; [ "$NPROC" -ge 1 ] || NPROC=1
    NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
    DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-32}"   # rows of 2048 tokens per GPU; halve it if memory runs out
    # Shards: params(d) = 2*65536*64d (embedding + head) + 12*(64d)^2*d (blocks); x20 tokens/param;
    # x4.8 chars/token (the tokenizer's compression on FineWeb-Edu); / 250M chars per shard; +10%.
    # d20: 561M params -> 11.2B tokens -> 54B chars -> 216 shards -> 238.
    SHARDS="${SHARDS:-$(python -c "
d = 64 * $DEPTH; params = 2 * 65536 * d + 12 * d * d * $DEPTH
print(int(params * 20 * 4.8 / 250e6 * 1.1) + 1)")}"
    mkdir -p "$SLIMCHAT_HOME"
    echo "speedrun: depth $DEPTH, $NPROC GPUs x $NNODES nodes, $SHARDS shards, SLIMCHAT_HOME=$SLIMCHAT_HOME"

    # tokenizer: 8 shards (2B chars) are enough to train it; the rest download meanwhile
    step download8 python pretrain.py --download=8
    python pretrain.py --download="$SHARDS" > "$SLIMCHAT_HOME/download.log" 2>&1 &
    download_pid=$!
    step tokenizer python bpe.py train --vocab_size=65536 --max_chars=2000000000
    step tokenizer_eval python bpe.py eval
    wait "$download_pid" || { echo "shard download failed: see $SLIMCHAT_HOME/download.log" >&2; exit 1; }

    # pretrain: d20 at 20 tokens/param, 524,288 tokens per step -> 21,400 steps, ~3e19 FLOPs
    step pretrain launch pretrain.py --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH_SIZE" \
        --save_every=1000 $(resume_flag base)
    step eval_base launch evaluate.py --stage=base
    # the multiple-choice chat tasks on the base model too: the "before" column of the report card
    step eval_base_chat launch evaluate.py --stage=base --tasks=ARC-Easy,ARC-Challenge,MMLU

    # mid-training: one pass over the §6 mixture (~850K conversations), then the chat evals
    step midtrain launch midtrain.py --device_batch_size="$DEVICE_BATCH_SIZE" --save_every=200 $(resume_flag mid)
    step eval_mid launch evaluate.py --stage=mid
    # SFT: one epoch of the §7 mixture (~23K conversations)
    step sft launch sft.py $(resume_flag sft)
    step eval_sft launch evaluate.py --stage=sft
    # RL on GSM8K: 467 steps of 16 questions x 16 samples
    step rl launch rl.py $(resume_flag rl)
    step eval_rl launch evaluate.py --stage=rl --tasks=GSM8K

    python evaluate.py --report=1
    echo "done. Talk to your model:  source .venv/bin/activate && python serve.py   (then open http://127.0.0.1:8000)"
    ;;

gpucheck)
    # What the CPU tests cannot settle, on one GPU in under 10 minutes with no network: compiled d20
    # training at the speedrun's settings (tokens/s, MFU, peak memory of training and of the val eval),
    # Engine decode tokens/s, a CORE slice and one request through serve.py. Works in
    # $SLIMCHAT_HOME/gpucheck/ (never the speedrun's files), writes $SLIMCHAT_HOME/gpucheck.json.
    setup_venv requirements.txt
    export SLIMCHAT_HOME="${SLIMCHAT_HOME:-$HOME/.cache/slimchat}"
    python tests/bench/gpucheck.py "${@:2}"
    ;;

tiny)
    # Every stage, shrunk, on the CPU against the offline mirror (tests/tinyworld.py): no network.
    setup_venv requirements.txt
    export SLIMCHAT_HOME="${SLIMCHAT_HOME:-$HOME/.cache/slimchat-tiny}"
    NPROC=1; NNODES=1
    mkdir -p "$SLIMCHAT_HOME"
    mirror="$SLIMCHAT_HOME/mirror"
    # the stages fetch from the mirror exactly as they would from the hub, through file:// URLs
    export HF_ENDPOINT="file://$mirror" SLIMCHAT_FILES_ENDPOINT="file://$mirror/files"
    echo "tiny: SLIMCHAT_HOME=$SLIMCHAT_HOME, mirror at $mirror"
    CHAT_TASKS="ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee"

    step mirror python tests/tinyworld.py --out="$mirror"
    step download python pretrain.py --download=4
    step tokenizer python bpe.py train --vocab_size=512
    step tokenizer_eval python bpe.py eval
    # a 2-layer model of width 128 (0.5M parameters): 1,500 steps of 1,024 tokens = 1.5M tokens,
    # about 1.5 passes over the mirror's shards. DEPTH=4 with --vocab_size=2048 solves nearly every
    # word problem after SFT (measured 0.99), which leaves RL nothing to show.
    step pretrain python pretrain.py --device=cpu --depth="${DEPTH:-2}" --n_embd=128 --n_head=2 --max_seq_len=128 \
        --device_batch_size=8 --total_batch_size=1024 --num_steps=1500 --eval_every=250 \
        --eval_tokens=8192 --sample_every=500 --save_every=500 $(resume_flag base)
    step eval_base python evaluate.py --stage=base --device=cpu --max_per_task=32 --bpb_tokens=8192
    # the chat tasks on the base model too: the "before" column that shows what mid and SFT add
    step eval_base_chat python evaluate.py --stage=base --device=cpu --tasks="$CHAT_TASKS" --max_new_tokens=96
    # mid: 600 steps of 1,024 tokens over the mixture, spelling tasks cut to the mirror's scale
    step midtrain python midtrain.py --device=cpu --num_steps=600 --simple_spelling_rows=300 \
        --spelling_bee_rows=300 --buffer_size=64 --eval_every=200 --eval_tokens=4096 --save_every=200 $(resume_flag mid)
    step eval_mid python evaluate.py --stage=mid --device=cpu --max_new_tokens=96
    # sft: 800 steps of 32 conversations, with 4 passes over MMLU auxiliary_train as the reference's
    # later SFT has, at 12x the reference's LR fraction. --loss_per=conversation: with the reference's
    # per-token mean, a one-letter answer weighs nothing next to a worked solution, and multiple
    # choice stays at chance at this size (tests/bench/RESULTS.md).
    step sft python sft.py --device=cpu --num_steps=800 --device_batch_size=32 --examples_per_step=32 \
        --smoltalk_rows=200 --spelling_rows=100 --mmlu_epochs=4 --init_lr_frac=0.25 --warmdown_frac=0.2 \
        --loss_per=conversation --eval_every=200 --eval_steps=4 --mc_every=400 --mc_problems=100 \
        --save_every=200 $(resume_flag sft)
    step eval_sft python evaluate.py --stage=sft --device=cpu --max_new_tokens=96
    # rl: 30 steps of 8 questions x 16 samples (a tiny model is right on few samples, and a group
    # with no right answer teaches nothing); init_lr_frac 0.3 because 0.05 barely moves it
    step rl python rl.py --device=cpu --num_steps=30 --examples_per_step=8 --num_samples=16 \
        --device_batch_size=16 --max_new_tokens=64 --init_lr_frac=0.3 --eval_every=15 --eval_examples=100 \
        --eval_samples=8 --save_every=15 $(resume_flag rl)
    step eval_rl python evaluate.py --stage=rl --device=cpu --tasks=GSM8K --max_new_tokens=96

    python evaluate.py --report=1
    python tests/check_report.py "$SLIMCHAT_HOME/report/report.json"
    echo "report card: $SLIMCHAT_HOME/report/report.md"
    echo "talk to the tiny model:  source .venv/bin/activate && SLIMCHAT_HOME=$SLIMCHAT_HOME python serve.py --device=cpu"
    ;;

*)
    echo "unknown preset '$preset': use one of speedrun, tiny, test, gpucheck" >&2
    exit 2
    ;;
esac
