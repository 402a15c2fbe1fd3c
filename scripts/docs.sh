#!/usr/bin/env bash
# Builds the documentation site (mkdocs.yml, docs/) with `mkdocs build --strict`: a broken link, a missing
# anchor or an API reference (mkdocstrings) that does not resolve fails the build.
#
#   ./scripts/docs.sh            # -> site/ (ignored by git)
#   ./scripts/docs.sh /tmp/site  # another folder
#
# Runs in the active virtual environment, else in .venv (created if missing); installs the docs tools there
# with pip when they are missing (the `docs` extra: mkdocs-material, mkdocstrings[python]).
set -euo pipefail
cd "$(dirname "$0")/.."
site="${1:-site}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  . .venv/bin/activate
fi
if ! python -c "import mkdocs, material, mkdocstrings, mkdocstrings_handlers.python" 2>/dev/null; then
  python -m pip install -q "mkdocs-material" "mkdocstrings[python]"
fi
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$site"
