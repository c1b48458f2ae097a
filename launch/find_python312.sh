#!/usr/bin/env bash
# Print the path of a working Python 3.12 interpreter (PATH first, then pyenv), or fail saying how to get one.
for c in "${PYTHON312:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 python3; do
  [ -n "$c" ] || continue
  if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; then
    command -v "$c" 2>/dev/null || echo "$c"; exit 0
  fi
done
echo "error: no Python 3.12 found; install it (e.g. 'pyenv install 3.12') or set PYTHON312=/path/to/python3.12" >&2
exit 1
