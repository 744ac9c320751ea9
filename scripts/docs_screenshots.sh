#!/usr/bin/env bash
# Build the docs and take headless-Chromium screenshots of the quickstart, configuration and benchmarks pages into
# docs/screenshots/ (the top of each page, 1280 px wide), to look at what a reader sees.
# Needs chromium (`apt-get install chromium`).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$site"
mkdir -p docs/screenshots
for page in quickstart configuration benchmarks; do
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,8000 \
    --screenshot="$site/$page.png" "file://$site/$page/index.html" 2>/dev/null
  .venv/bin/python - "$site/$page.png" "docs/screenshots/$page.png" <<'PY'
import sys
from PIL import Image
image = Image.open(sys.argv[1])
image.crop((0, 0, image.width, min(image.height, 2600))).save(sys.argv[2], optimize=True)
PY
done
echo "docs/screenshots/{quickstart,configuration,benchmarks}.png"
