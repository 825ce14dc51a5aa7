#!/usr/bin/env bash
# docs/benchmarks.md's variant table in one command: every run of benchmarks/run_alignment.py behind its variants
# that train_inpo.py can still express (both rewards, each with its flipped-label control, every method on 3 training
# seeds, online and from the cache; Diffusion-DPO and the default also for 200 steps), two runs at a time with one
# thread each, then benchmarks/summarize_alignment.py's tables and plot.
#
#   bash benchmarks/run_variants.sh [OUT_DIR]      # default benchmarks/out/variants; 111 runs, roughly 5 hours on 2 CPU cores
#   DRY_RUN=1 bash benchmarks/run_variants.sh      # list the runs only
#
# Finished runs are not redone: a run whose results file exists is skipped, so an interrupted sweep can be resumed
# (results left in OUT_DIR by another commit count as finished too: start a new OUT_DIR after an update). The variants
# that need flags train_inpo.py no longer has (the exact endpoint, the hybrid, timestep ranges, keep-x0, eta 0.1 or
# policy inversion of the inverted noise) are listed by this script at commit 50197e0; their results are in docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/out/variants}"
export OMP_NUM_THREADS=1
export out common="--out_dir $out --learning_rate 1e-3 --beta_dpo 5000 --eval_seeds 4 --base_seed 0 --max_train_steps 100"

jobs=()
for reward in background_brightness edge_sharpness; do
  for flip in "" --flipped_labels; do
    for seed in 0 1 2; do
      jobs+=("--reward $reward${flip:+ $flip} --seed $seed --methods inverted_noise diffusion_dpo --results_tag main")
      for variant in inpo_grid:authors inverted_noise_mix50:mix50 inverted_noise_k50:k50 \
          inverted_noise_mix50_k5:mix50k5; do
        jobs+=("--reward $reward${flip:+ $flip} --seed $seed --methods ${variant%%:*} --results_tag ${variant##*:}")
      done
    done
  done
done
# From the invert-once cache (precompute + training, timed together).
for reward in background_brightness edge_sharpness; do
  for flip in "" --flipped_labels; do
    for seed in 0 1 2; do
      for variant in inverted_noise_cached:cached inverted_noise_mix50_cached:mix50cached \
          inverted_noise_mix50_cached_k5:cachedk5; do
        jobs+=("--reward $reward${flip:+ $flip} --seed $seed --methods ${variant%%:*} --results_tag ${variant##*:}")
      done
    done
  done
done
# Diffusion-DPO's 200-step gain (the yardstick: does a method reach it within 100 steps?) and the default trained as
# long (both rewards, with controls): the same method names trained longer, so in their own folder to keep the
# summary from merging them with the 100-step runs.
for seed in 0 1 2; do
  jobs+=("--reward background_brightness --seed $seed --methods diffusion_dpo --results_tag dpo200 \
--out_dir $out/dpo200 --max_train_steps 200")
  for reward in background_brightness edge_sharpness; do
    for flip in "" --flipped_labels; do
      jobs+=("--reward $reward${flip:+ $flip} --seed $seed --methods inverted_noise_mix50_k5 --results_tag default200 \
--out_dir $out/dpo200 --max_train_steps 200")
    done
  done
done

if [ -n "${DRY_RUN:-}" ]; then
  for line in "${jobs[@]}"; do echo "python benchmarks/run_alignment.py $common $line"; done
  exit 0
fi
# The shipped base model (benchmarks/assets) and one sampling of 512 pairs serve every run.
mkdir -p "$out"
[ -d "$out/base_model" ] || cp -r benchmarks/assets/world_base_model "$out/base_model"
python - "$out" <<'PY'
import sys
from benchmarks import run_alignment as ra
for reward in ("background_brightness", "edge_sharpness"):
    for flip in ([], ["--flipped_labels"]):
        ra.prepare_world(ra.parse_args(["--out_dir", sys.argv[1], "--reward", reward, "--base_seed", "0", *flip]))
PY

mkdir -p "$out/dpo200"
for shared in base_model pairs pair_images.npz; do ln -sfn "../$shared" "$out/dpo200/$shared"; done

run_one() {
  local line="$1" tag reward flipped seed dir="$out"
  if [[ "$line" == *"--out_dir "* ]]; then dir=$(sed -E 's/.*--out_dir ([^ ]+).*/\1/' <<<"$line"); fi
  reward=$(sed -E 's/.*--reward ([a-z_]+).*/\1/' <<<"$line")
  seed=$(sed -E 's/.*--seed ([0-9]+).*/\1/' <<<"$line")
  tag=$(sed -E 's/.*--results_tag ([a-z0-9_]+).*/\1/' <<<"$line")
  flipped=$([[ "$line" == *--flipped_labels* ]] && echo _flipped || true)
  if [ -f "$dir/alignment_${reward}${flipped}_seed${seed}_${tag}_results.json" ]; then
    return 0
  fi
  # shellcheck disable=SC2086  # the flags are words
  python benchmarks/run_alignment.py $common $line >"$dir/log_${reward}${flipped}_seed${seed}_${tag}.txt" 2>&1
}
export -f run_one
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run_one "$1"' _ {}
python benchmarks/summarize_alignment.py --out_dir "$out" --plot "$out/variants.png"
python benchmarks/summarize_alignment.py --out_dir "$out/dpo200"
