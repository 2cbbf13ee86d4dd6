#!/usr/bin/env bash
# Install Debian's headless Chromium for the report rendering test, if missing and possible.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "chromium is not installed and this is not root: the report rendering test will be skipped" >&2
  exit 0
fi
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
  || echo "could not install chromium: the report rendering test will be skipped" >&2
