#!/usr/bin/env bash
# Apply pipeweaver_megatron's patches (patches/*.patch) to a Megatron-LM checkout at tag
# core_v0.16.1. Idempotent: patches already applied are skipped ("already applied"),
# and nothing is changed unless every patch either applies or is already applied.
#
#   scripts/apply_patches.sh MEGATRON_DIR
#
# Exit status: 0 applied or already applied; 1 a patch conflicts; 2 usage, not a git
# checkout, or not at core_v0.16.1.
set -euo pipefail

TAG=core_v0.16.1
COMMIT=55ac7082517c3878ae653c07c09c534b8aed49f6
PATCHES="$(cd "$(dirname "${BASH_SOURCE[0]}")/../patches" && pwd)"

die() { local code=$1; shift; echo "apply_patches: error: $*" >&2; exit "$code"; }

[ $# -eq 1 ] || die 2 "usage: $0 MEGATRON_DIR (a Megatron-LM git checkout at $TAG)"
DIR=$1
[ -d "$DIR" ] || die 2 "$DIR: no such directory"
head=$(git -C "$DIR" rev-parse --verify -q HEAD 2>/dev/null) ||
    die 2 "$DIR is not a git checkout of Megatron-LM (clone it and check out $TAG)"
top=$(git -C "$DIR" rev-parse --show-toplevel)
[ "$(cd "$top" && pwd -P)" = "$(cd "$DIR" && pwd -P)" ] ||
    die 2 "$DIR is inside the git checkout $top; pass its top directory"
[ "$head" = "$COMMIT" ] ||
    die 2 "$DIR is at commit $head, not Megatron-LM $TAG ($COMMIT): run git -C $DIR checkout $TAG"

shopt -s nullglob
patches=("$PATCHES"/*.patch)
[ ${#patches[@]} -gt 0 ] || die 2 "no patches in $PATCHES"

todo=()
for patch in "${patches[@]}"; do
    name=$(basename "$patch")
    if err=$(git -C "$DIR" apply --check "$patch" 2>&1); then
        todo+=("$patch")
    elif git -C "$DIR" apply --reverse --check "$patch" >/dev/null 2>&1; then
        echo "$name: already applied"
    else
        echo "$err" >&2
        die 1 "$name does not apply to $DIR and is not already applied" \
            "(local changes to the files it touches?); nothing was changed"
    fi
done

for patch in "${todo[@]}"; do
    git -C "$DIR" apply "$patch"
    echo "$(basename "$patch"): applied"
done
if [ ${#todo[@]} -eq 0 ]; then
    echo "all patches already applied to $DIR"
fi
