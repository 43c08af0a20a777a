#!/usr/bin/env bash
# Draw docs/images/*.png with the project's own commands, following the quickstart of docs/index.md:
# a short run of the fast preset on real Omniglot (4 epochs, about 500 steps), then `siamese eval --plot`,
# `siamese compare --plot` and `siamese classify`. Needs the `plot` extra and Omniglot's archives in a
# folder (a mirror: images_background.zip and images_evaluation.zip); the default is ../shared/omniglot.
#
#   scripts/make_doc_images.sh [OMNIGLOT_FOLDER] [WORK_FOLDER]
#
# WORK_FOLDER (default: a new temporary folder) keeps the run, the data and the outputs; the images are
# copied into docs/images/. The run is on the CPU with a fixed seed.
set -euo pipefail
cd "$(dirname "$0")/.."
docs_images=$PWD/docs/images
export SIAMESE_OMNIGLOT_MIRROR
SIAMESE_OMNIGLOT_MIRROR=$(realpath "${1:-../shared/omniglot}")
work=$(realpath "${2:-$(mktemp -d)}")
siamese=${SIAMESE:-siamese}
mkdir -p "$work" "$docs_images"
cd "$work"
echo "working in $work" >&2

# the quickstart, as written in docs/index.md (with --device cpu for the same pictures on every machine)
started=$SECONDS
$siamese train --epochs 4 --out logs/quick --device cpu
echo "step 1 (train) took $((SECONDS - started)) s on $(nproc) cores" | tee train_time.txt
$siamese eval logs/quick/best.pt --device cpu --plot plots --json > eval.json
python3 -m zipfile -e datasets/images_evaluation.zip .
mkdir -p support
for c in images_evaluation/Angelic/character*; do cp "$c"/*_01.png "support/$(basename "$c").png"; done
$siamese classify images_evaluation/Angelic/character05/*_02.png --support support \
    --checkpoint logs/quick/best.pt --device cpu | tee classify.txt

# pictures of a pair of drawings of one character and a pair of two characters
angelic=images_evaluation/Angelic
$siamese compare $angelic/character02/*_03.png $angelic/character02/*_11.png -c logs/quick/best.pt --device cpu \
    --plot plots/compare_same.png | tee compare.txt
$siamese compare $angelic/character02/*_03.png $angelic/character07/*_03.png -c logs/quick/best.pt --device cpu \
    --plot plots/compare_different.png | tee -a compare.txt

cp logs/quick/epoch_loss.png plots/roc.png plots/hardest_trials.png plots/compare_same.png \
    plots/compare_different.png "$docs_images/"
ls -l "$docs_images"
