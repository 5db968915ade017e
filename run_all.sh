#!/usr/bin/env bash
# slimchat: the whole pipeline in one script.
#   bash run_all.sh          speedrun preset: one 8xH100 node, a few hours
#   bash run_all.sh tiny     the same stages, shrunk, on CPU against the offline mirror
#   bash run_all.sh test     install everything the tests need, then run pytest
#   bash run_all.sh help     the presets, every environment knob, the exit statuses
#   bash run_all.sh gpucheck the GPU acceptance run: <= 10 minutes on one GPU, no network
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-speedrun}"

# ---------------------------------------------------------------------------
# environment: create or reuse .venv, install what requirements*.txt declare.
# A stamp of the requirement files' hash skips pip entirely when nothing changed.
# build: a PyTorch CUDA build (cu126, ...: torch_build below) to take torch from; cpu = pip's default.
setup_venv() {
    local reqs="$1" build="${2:-cpu}"
    if [ ! -x .venv/bin/python ]; then
        local fresh=1; [ -e .venv ] && fresh=""
        if ! python3 -m venv .venv; then
            [ -z "$fresh" ] || rm -rf .venv   # a half-made .venv (no pip) would pass the check above next time
            echo "run_all.sh: 'python3 -m venv' failed. On Debian/Ubuntu install its module: sudo apt install python3-venv" >&2
            exit 1
        fi
    fi
    local stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename "$reqs")"
    [ "$build" = cpu ] || stamp="$stamp-$build"
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        if [ "$build" != cpu ]; then
            # torch from PyTorch's own index, as torch==<pinned version>+<build>; requirements.txt's
            # pin then holds (2.13.0+cu126 is a 2.13.0) and pip leaves it be
            echo "installing $(grep '^torch==' requirements.txt)+$build from https://download.pytorch.org/whl/$build"
            .venv/bin/python -m pip install --quiet "$(grep '^torch==' requirements.txt)+$build" \
                --index-url "https://download.pytorch.org/whl/$build"
        fi
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
            echo "run_all.sh test: running as root, so installing Debian's chromium and chromium-driver" \
                 "with apt-get for the browser test (as a normal user that test is skipped instead)"
            (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
                || echo "warning: could not install chromium; the browser test will be skipped"
        fi
    fi
}

# HumanEval's code sandbox isolates programs with bubblewrap; install it likewise, so the tests
# exercise the isolated path (without it they test the unisolated fallback and skip the rest).
install_bwrap() {
    if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run_all.sh test: running as root, so installing Debian's bubblewrap with apt-get for the" \
             "code sandbox's isolation tests"
        (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) \
            || echo "warning: could not install bubblewrap; the sandbox's isolation tests will be skipped"
    fi
}

# The NVIDIA driver's version; without a working nvidia-smi, stop and say what to do.
gpu_driver() {
    local out
    if ! command -v nvidia-smi >/dev/null; then
        echo "run_all.sh: the speedrun trains on NVIDIA GPUs, and this machine has no nvidia-smi (it comes with" \
             "the NVIDIA driver). On a GPU machine install the driver (README: What the speedrun needs);" \
             "on a CPU machine run the same pipeline, shrunk: bash run_all.sh tiny" >&2
        exit 1
    fi
    if ! out="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1)"; then
        echo "run_all.sh: nvidia-smi finds no usable GPU: $out" >&2
        echo "  Check the NVIDIA driver (README: What the speedrun needs); on a CPU machine run: bash run_all.sh tiny" >&2
        exit 1
    fi
    echo "${out%%$'\n'*}"   # one line per GPU, all the same driver
}

# The PyTorch CUDA build that runs on NVIDIA driver $1: the newest whose CUDA version the driver
# supports; "cpu" (pip's default torch) when there is no driver. Minimum Linux drivers are those of
# the GA release of each CUDA version in NVIDIA's CUDA Toolkit release notes, Table 3 "CUDA Toolkit
# and Corresponding Driver Versions": 13.0 >= 580.65.06, 12.9 >= 575.51.03, 12.8 >= 570.26,
# 12.6 >= 560.28.03, 12.4 >= 550.54.14, 12.2 >= 535.54.03. PyTorch publishes the pinned torch for
# CUDA 12.6, 12.8 and 13.0 (https://download.pytorch.org/whl/cu126 ...; PyPI's own wheel is the
# CUDA 13.0 one); check that list when the pin in requirements.txt moves.
torch_build() {
    local driver="$1" build min
    if [ -z "$driver" ]; then echo cpu; return; fi
    if ! [[ "$driver" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
        echo "run_all.sh: '$driver' is not an NVIDIA driver version (as nvidia-smi prints it: 570.86.15)" >&2
        return 1
    fi
    for build in cu130:580.65.06 cu128:570.26 cu126:560.28.03; do
        min="${build#*:}"
        if [ "$(printf '%s\n' "$min" "$driver" | sort -V | head -n 1)" = "$min" ]; then
            echo "${build%%:*}"
            return
        fi
    done
    echo "run_all.sh: NVIDIA driver $driver is older than every CUDA build of the pinned torch (the oldest," \
         "cu126, needs 560.28.03). Upgrade the driver (R570 or R580), or try TORCH_BUILD=cu126 anyway: CUDA 12" \
         "builds may run on drivers from 525.60.13 through CUDA's minor version compatibility, without some features." >&2
    return 1
}

# ---------------------------------------------------------------------------
# pipeline plumbing
# Each finished step leaves a stamp in $SLIMCHAT_HOME/run_all/ (a stage's stamp names its model tag,
# d$DEPTH, so a run at another DEPTH in the same home trains anew), so re-running the script after a
# crash skips what is done; a training stage that crashed mid-way resumes from its last checkpoint.
# Ctrl-C or SIGTERM stops the pipeline: the training stage saves a checkpoint and exits with status
# 75 ("stopped early, checkpoint saved": gpt.STOPPED_EXIT_CODE), the step stays unstamped, this
# script exits with 75 too, and its next run resumes the stage.
STOPPED=75
interrupted=""
stage_pid=""
download_pid=""
# Steps run in the background while this shell waits for them: bash runs no trap while a command
# runs in the foreground, so a SIGTERM sent to this script alone would not reach the stage.
# (Ctrl-C reaches both through the terminal; a second signal to a stage changes nothing.)
on_signal() {
    local pid
    interrupted=1
    for pid in "$stage_pid" "$download_pid"; do
        [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true
    done
}
trap on_signal INT TERM

stop_if_interrupted() {
    if [ -n "$interrupted" ]; then
        echo "== $1: stopped (Ctrl-C or SIGTERM), not stamped. Run the same command again to go on from" \
             "here: a training stage resumes from the checkpoint it saved." >&2
        exit "$STOPPED"
    fi
}

# Wait for background process $1 and return its exit status; a trap that runs meanwhile ends
# bash's wait early, which is not the process's end.
wait_for() {
    local rc=0
    wait "$1" || rc=$?
    while kill -0 "$1" 2>/dev/null; do rc=0; wait "$1" || rc=$?; done
    return "$rc"
}

step() {
    local name="$1"; shift
    local stamp="$SLIMCHAT_HOME/run_all/$name.done"
    stop_if_interrupted "$name"
    if [ -f "$stamp" ]; then echo "== $name: done already (delete $stamp to redo it)"; return; fi
    echo "== $name: $*"
    local t0=$SECONDS rc=0
    "$@" &
    stage_pid=$!
    wait_for "$stage_pid" || rc=$?
    stage_pid=""
    if [ "$rc" = "$STOPPED" ]; then interrupted=1; fi   # the stage itself was signalled
    if [ "$rc" != 0 ]; then
        stop_if_interrupted "$name"
        echo "== $name: failed (exit status $rc)" >&2
        exit "$rc"
    fi
    mkdir -p "$SLIMCHAT_HOME/run_all" && touch "$stamp"
    echo "== $name: finished in $((SECONDS - t0)) s"
}

# --resume=1 when stage $1 already wrote a checkpoint under tag $2 (a stopped or crashed earlier
# attempt), else nothing. The tag (d<depth>) matters: another DEPTH's checkpoint is no resume point.
resume_flag() {
    python -c "import gpt, sys; sys.exit(0 if gpt.latest_step('$1', '$2') is not None else 1)" 2>/dev/null \
        && echo "--resume=1" || true
}

# Training stages run under torchrun on GPUs (one process per GPU, NNODES nodes), plain python on CPU.
# exec: step() runs this in a background subshell and signals that process, so it must become the stage.
# torchrun gives its workers --shutdown_timeout seconds (default 30) after a signal before it kills
# them: time for the step in flight (an RL step takes a while) and a d20 checkpoint of several GB.
launch() {
    if [ "$NPROC" -le 1 ] && [ "$NNODES" -le 1 ]; then
        exec python "$@"
    elif [ "$NNODES" -le 1 ]; then
        exec torchrun --standalone --nproc_per_node="$NPROC" --shutdown_timeout=300 "$@"
    else  # multi-node: run this script on every node with the same MASTER_ADDR and its own NODE_RANK
        exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
            --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --shutdown_timeout=300 "$@"
    fi
}

usage() {
    cat <<'USAGE'
usage: bash run_all.sh [PRESET]
presets:
  speedrun     (the default) every stage on one node of NVIDIA GPUs (8xH100: d20 in a few hours);
               installs the torch build for the machine's NVIDIA driver into .venv
  tiny         every stage, shrunk, on the CPU against the offline mirror: minutes, no network
  test [ARGS]  install the test tools into .venv, then run pytest ARGS; as root it also installs
               Debian's chromium, chromium-driver and bubblewrap with apt-get (browser and sandbox tests)
  gpucheck [ARGS]  the GPU acceptance run (at most 10 minutes on one GPU, no network): compiled d20
               training (tokens/s, MFU, peak memory), decode, a CORE slice, one serve.py request;
               writes $SLIMCHAT_HOME/gpucheck.json (ARGS: tests/bench/gpucheck.py --help)
  help         this text
environment knobs (speedrun):
  DEPTH=20                  the one dial: width 64*DEPTH, horizon 20 tokens per parameter
  NPROC=<GPUs listed>       processes (GPUs) per node
  NNODES=1, NODE_RANK=0     nodes, and this node's rank (multi-node: run on every node)
  MASTER_ADDR=127.0.0.1, MASTER_PORT=29500   rendezvous of the nodes
  DEVICE_BATCH_SIZE=<fits>  rows of 2048 tokens per GPU per micro-step; unset: the largest power of two
                            that fits the GPU memory (pretrain.py prints why); lower it on an OOM
  SHARDS=<from DEPTH>       pretraining shards to download (250M characters each)
  TORCH_BUILD=<from driver> PyTorch CUDA build to install: cu126, cu128, cu130, or cpu
environment knobs (tiny):
  DEPTH=2                   layers of the width-128 model
environment knobs (everywhere):
  SLIMCHAT_HOME             where a run lives (~/.cache/slimchat; tiny: ~/.cache/slimchat-tiny)
  HF_ENDPOINT               hub base URL (https://huggingface.co), e.g. a mirror
  SLIMCHAT_FILES_ENDPOINT   base URL of the non-hub files (eval bundle, identity conversations, words)
exit status: 0 done; 75 stopped early by Ctrl-C or SIGTERM (the stage saved a checkpoint, nothing
was stamped: run the same command again to resume); anything else: the step named above failed.
Finished steps leave stamps in $SLIMCHAT_HOME/run_all/ and are skipped when run again (a stage's
stamp names its model tag, d$DEPTH: another DEPTH in the same home trains anew).
USAGE
}

# Sourced (tests/test_run_all.py calls these functions one by one): define them, run nothing.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "$preset" in
help | -h | --help)
    usage
    ;;

test)
    setup_venv requirements-test.txt
    install_browser
    install_bwrap
    python -m pytest -q "${@:2}"
    ;;

speedrun)
    # One 8xH100 node, about four hours (REFERENCE.md §12.2: the d20 run of the reference).
    # GPUs only: a CPU torch (or one built for a newer CUDA than the driver runs) would train d20
    # on the CPU for weeks without an error. The stages get --device=cuda, which stops there too.
    driver="$(gpu_driver)"
    TORCH_BUILD="${TORCH_BUILD:-$(torch_build "$driver")}"
    echo "speedrun: NVIDIA driver $driver, torch build $TORCH_BUILD"
    setup_venv requirements.txt "$TORCH_BUILD"
    python -c "import gpt; gpt.compute_init('cuda')"   # torch sees the GPUs, or stop now with the fix
    export OMP_NUM_THREADS=1
    export SLIMCHAT_HOME="${SLIMCHAT_HOME:-$HOME/.cache/slimchat}"
    DEPTH="${DEPTH:-20}"                 # the one dial: width 64*DEPTH, horizon 20 tokens/param
    tag="d$DEPTH"                        # this depth's checkpoints: checkpoints/<stage>/d<DEPTH>
    NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"; [ "$NPROC" -ge 1 ] || NPROC=1
    NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
    # rows of 2048 tokens per GPU; unset: pretrain.py picks the largest power of two that fits the
    # GPU's memory and prints why (d20 32, d26 16, d32 8 on 80 GB); midtrain inherits pretrain's
    DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-}"
    # Shards: DEPTH's horizon (20 tokens/param), / 0.65 (the best-fit packer crops about 35% of the
    # tokens it reads at T=2048), x 4.8 chars/token, / 250M chars per shard, +10% (pretrain.py
    # depth_shards; tests/bench/RESULTS.md). d20: 11.2B tokens -> 365 shards; d26 704; d32 1222.
    SHARDS="${SHARDS:-$(python -c "import pretrain as p
print(p.depth_shards($DEPTH, p.max_seq_len, p.total_batch_size, p.target_param_data_ratio))")}"
    mkdir -p "$SLIMCHAT_HOME"
    echo "speedrun: depth $DEPTH, $NPROC GPUs x $NNODES nodes, $SHARDS shards, SLIMCHAT_HOME=$SLIMCHAT_HOME"

    # the run at full size on the meta device, in seconds: stops now if the batch cannot fit
    python pretrain.py --preflight=1 --depth="$DEPTH" ${DEVICE_BATCH_SIZE:+--device_batch_size="$DEVICE_BATCH_SIZE"}

    # tokenizer: 8 shards (2B chars) are enough to train it; the rest download meanwhile
    step download8 python pretrain.py --download=8
    python pretrain.py --download="$SHARDS" > "$SLIMCHAT_HOME/download.log" 2>&1 &
    download_pid=$!
    step tokenizer python bpe.py train --vocab_size=65536 --max_chars=2000000000
    step tokenizer_eval python bpe.py eval
    wait_for "$download_pid" || { stop_if_interrupted download
                                  echo "shard download failed: see $SLIMCHAT_HOME/download.log" >&2; exit 1; }
    download_pid=""

    # pretrain: d20 at 20 tokens/param, 524,288 tokens per step -> 21,400 steps, ~3e19 FLOPs
    step pretrain-$tag launch pretrain.py --device=cuda --depth="$DEPTH" ${DEVICE_BATCH_SIZE:+--device_batch_size="$DEVICE_BATCH_SIZE"} \
        --save_every=1000 $(resume_flag base "$tag")
    step eval_base-$tag launch evaluate.py --device=cuda --stage=base
    # the multiple-choice chat tasks on the base model too: the "before" column of the report card
    step eval_base_chat-$tag launch evaluate.py --device=cuda --stage=base --tasks=ARC-Easy,ARC-Challenge,MMLU

    # mid-training: one pass over the §6 mixture (~850K conversations), then the chat evals
    step midtrain-$tag launch midtrain.py --device=cuda --model_tag="$tag" ${DEVICE_BATCH_SIZE:+--device_batch_size="$DEVICE_BATCH_SIZE"} \
        --save_every=200 $(resume_flag mid "$tag")
    step eval_mid-$tag launch evaluate.py --device=cuda --stage=mid
    # SFT: one epoch of the §7 mixture (~23K conversations)
    step sft-$tag launch sft.py --device=cuda --model_tag="$tag" $(resume_flag sft "$tag")
    step eval_sft-$tag launch evaluate.py --device=cuda --stage=sft
    # RL on GSM8K: 467 steps of 16 questions x 16 samples
    step rl-$tag launch rl.py --device=cuda --model_tag="$tag" $(resume_flag rl "$tag")
    step eval_rl-$tag launch evaluate.py --device=cuda --stage=rl --tasks=GSM8K

    python evaluate.py --report=1
    echo "done. Talk to your model:  source .venv/bin/activate && python serve.py   (then open http://127.0.0.1:8000)"
    ;;

gpucheck)
    # What the CPU tests cannot settle, on one GPU in under 10 minutes with no network: compiled d20
    # training at the speedrun's settings (tokens/s, MFU, peak memory of training and of the val eval),
    # Engine decode tokens/s, a CORE slice and one request through serve.py. Works in
    # $SLIMCHAT_HOME/gpucheck/ (never the speedrun's files), writes $SLIMCHAT_HOME/gpucheck.json.
    # The torch build for this driver, as the speedrun installs it (`--smoke=1` on a CPU machine:
    # python tests/bench/gpucheck.py --smoke=1, no run_all.sh).
    driver="$(gpu_driver)"
    TORCH_BUILD="${TORCH_BUILD:-$(torch_build "$driver")}"
    setup_venv requirements.txt "$TORCH_BUILD"
    export SLIMCHAT_HOME="${SLIMCHAT_HOME:-$HOME/.cache/slimchat}"
    python tests/bench/gpucheck.py "${@:2}"
    ;;

tiny)
    # Every stage, shrunk, on the CPU against the offline mirror (tests/tinyworld.py): no network.
    setup_venv requirements.txt
    export SLIMCHAT_HOME="${SLIMCHAT_HOME:-$HOME/.cache/slimchat-tiny}"
    NPROC=1; NNODES=1
    DEPTH="${DEPTH:-2}"; tag="d$DEPTH"
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
    step pretrain-$tag python pretrain.py --device=cpu --depth="$DEPTH" --n_embd=128 --n_head=2 --max_seq_len=128 \
        --device_batch_size=8 --total_batch_size=1024 --num_steps=1500 --eval_every=250 \
        --eval_tokens=8192 --sample_every=500 --save_every=500 $(resume_flag base "$tag")
    step eval_base-$tag python evaluate.py --stage=base --device=cpu --max_per_task=32 --bpb_tokens=8192
    # the chat tasks on the base model too: the "before" column that shows what mid and SFT add
    step eval_base_chat-$tag python evaluate.py --stage=base --device=cpu --tasks="$CHAT_TASKS" --max_new_tokens=96
    # mid: 600 steps of 1,024 tokens over the mixture, spelling tasks cut to the mirror's scale
    step midtrain-$tag python midtrain.py --device=cpu --num_steps=600 --simple_spelling_rows=300 \
        --spelling_bee_rows=300 --buffer_size=64 --eval_every=200 --eval_tokens=4096 --save_every=200 $(resume_flag mid "$tag")
    step eval_mid-$tag python evaluate.py --stage=mid --device=cpu --max_new_tokens=96
    # sft: 800 steps of 32 conversations, with 4 passes over MMLU auxiliary_train as the reference's
    # later SFT has, at 12x the reference's LR fraction. --loss_per=conversation: with the reference's
    # per-token mean, a one-letter answer weighs nothing next to a worked solution, and multiple
    # choice stays at chance at this size (tests/bench/RESULTS.md).
    step sft-$tag python sft.py --device=cpu --num_steps=800 --device_batch_size=32 --examples_per_step=32 \
        --smoltalk_rows=200 --spelling_rows=100 --mmlu_epochs=4 --init_lr_frac=0.25 --warmdown_frac=0.2 \
        --loss_per=conversation --eval_every=200 --eval_steps=4 --mc_every=400 --mc_problems=100 \
        --save_every=200 $(resume_flag sft "$tag")
    step eval_sft-$tag python evaluate.py --stage=sft --device=cpu --max_new_tokens=96
    # rl: 30 steps of 8 questions x 16 samples (a tiny model is right on few samples, and a group
    # with no right answer teaches nothing); init_lr_frac 0.3 because 0.05 barely moves it
    step rl-$tag python rl.py --device=cpu --num_steps=30 --examples_per_step=8 --num_samples=16 \
        --device_batch_size=16 --max_new_tokens=64 --init_lr_frac=0.3 --eval_every=15 --eval_examples=100 \
        --eval_samples=8 --save_every=15 $(resume_flag rl "$tag")
    step eval_rl-$tag python evaluate.py --stage=rl --device=cpu --tasks=GSM8K --max_new_tokens=96

    python evaluate.py --report=1
    python tests/check_report.py "$SLIMCHAT_HOME/report/report.json"
    echo "report card: $SLIMCHAT_HOME/report/report.md"
    echo "talk to the tiny model:  source .venv/bin/activate && SLIMCHAT_HOME=$SLIMCHAT_HOME python serve.py --device=cpu"
    ;;

*)
    echo "unknown preset '$preset': use one of speedrun, tiny, test, gpucheck (bash run_all.sh help says more)" >&2
    exit 2
    ;;
esac
