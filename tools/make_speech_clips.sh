#!/usr/bin/env bash
# Regenerates tests/data/speech: synthetic English speech with known text (espeak-ng,
# 125 words/min, 30 ms word gaps, 16 kHz mono 16-bit). Needs: apt-get install espeak-ng sox
set -euo pipefail
out="$(dirname "$0")/../tests/data/speech"
mkdir -p "$out"
i=0
while IFS= read -r text; do
  i=$((i + 1)); name=$(printf "%02d" "$i")
  espeak-ng -v en-us -s 125 -g 3 -w "$out/$name.raw.wav" "$text"
  sox "$out/$name.raw.wav" -r 16000 -b 16 "$out/$name.wav" && rm "$out/$name.raw.wav"
  printf "%s\t%s\n" "$name" "$text"
done < "$out/texts.txt" > "$out/transcripts.tsv"
