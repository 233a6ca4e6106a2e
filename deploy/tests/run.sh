#!/bin/bash
# Offline checks of everything under deploy/. Prints one PASS/FAIL/SKIP line
# per check and a closing "deploy: N passed, M failed" line; exits non-zero if
# any check failed. Installs what it needs when missing (apt: shellcheck,
# prometheus for promtool, systemd for systemd-analyze; pip: python-hcl2,
# PyYAML). terraform and gcloud must already be installed.
#
#   bash deploy/tests/run.sh            # all checks
#   VERBOSE=1 bash deploy/tests/run.sh  # also print each check's output
#   ONLY=promtool bash deploy/tests/run.sh   # only checks whose name matches (grep -E)
set -euo pipefail

TESTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPLOY="$(dirname "$TESTS")"
REPO="$(dirname "$DEPLOY")"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# No network but package registries: terraform must not phone home.
export CHECKPOINT_DISABLE=1
export TF_CLI_CONFIG_FILE="$WORK/terraformrc"
: >"$TF_CLI_CONFIG_FILE"

passed=0
failed=0
skipped=0

# check NAME CMD...: run one check; its output goes to a log shown on failure.
check() {
  local name="$1" log
  shift
  if [[ -n "${ONLY:-}" ]] && ! grep -Eq -- "$ONLY" <<<"$name"; then
    return 0
  fi
  log="$WORK/log.$((passed + failed + skipped))"
  if (cd "$REPO" && "$@") >"$log" 2>&1; then
    printf 'PASS %s\n' "$name"
    passed=$((passed + 1))
    [[ "${VERBOSE:-0}" != 1 ]] || sed 's/^/    /' "$log"
  else
    printf 'FAIL %s\n' "$name"
    failed=$((failed + 1))
    tail -n 40 "$log" | sed 's/^/    /'
  fi
}

skip() {
  if [[ -n "${ONLY:-}" ]] && ! grep -Eq -- "$ONLY" <<<"$1"; then
    return 0
  fi
  printf 'SKIP %s (%s)\n' "$1" "$2"
  skipped=$((skipped + 1))
}

fail() {
  printf 'FAIL %s (%s)\n' "$1" "$2"
  failed=$((failed + 1))
}

# ---- tools ---------------------------------------------------------------------

apt_missing=()
command -v shellcheck >/dev/null 2>&1 || apt_missing+=(shellcheck)
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || apt_missing+=(systemd)
if ((${#apt_missing[@]} > 0)); then
  printf 'installing %s\n' "${apt_missing[*]}" >&2
  if ! { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"; } >"$WORK/apt.log" 2>&1; then
    tail -n 20 "$WORK/apt.log" >&2
    # Install what can be installed one by one (systemd may be refused in a container).
    for pkg in "${apt_missing[@]}"; do
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >>"$WORK/apt.log" 2>&1 || true
    done
  fi
fi
if ! "$PYTHON" -c 'import hcl2; hcl2.SerializationOptions' >/dev/null 2>&1; then
  printf 'installing python-hcl2\n' >&2
  "$PYTHON" -m pip install -q 'python-hcl2>=8,<9' >&2 || true
fi
if ! "$PYTHON" -c 'import yaml' >/dev/null 2>&1; then
  printf 'installing PyYAML\n' >&2
  "$PYTHON" -m pip install -q PyYAML >&2 || true
fi

# terraform and gcloud are not installed by this script: missing means FAIL.
tools_present() {
  local t rc=0
  for t in terraform gcloud shellcheck promtool; do
    command -v "$t" >/dev/null 2>&1 || { echo "missing: $t"; rc=1; }
  done
  "$PYTHON" -c 'import hcl2, yaml; hcl2.SerializationOptions' || rc=1
  return "$rc"
}
check "required tools present (terraform, gcloud, shellcheck, promtool, python-hcl2, PyYAML)" tools_present

# ---- shell scripts -------------------------------------------------------------

mapfile -t scripts < <(cd "$REPO" && find deploy -name '*.sh' -type f | sort)
check "shellcheck (${#scripts[@]} scripts)" shellcheck -x "${scripts[@]}"
# Executables start with #!/bin/bash and set -euo pipefail (the shutdown
# script deliberately goes on after a failed stop); sourced files declare bash.
strict_mode() {
  local f rc=0
  for f in "$@"; do
    case "$f" in
      */config.sh | */lib.sh) head -n 1 "$f" | grep -q '^# shellcheck shell=bash' || { echo "$f: no shell=bash"; rc=1; } ;;
      */odin-ws-shutdown.sh) head -n 1 "$f" | grep -qx '#!/bin/bash' || { echo "$f: no bash shebang"; rc=1; } ;;
      *)
        head -n 1 "$f" | grep -qx '#!/bin/bash' || { echo "$f: no bash shebang"; rc=1; }
        grep -qx 'set -euo pipefail' "$f" || { echo "$f: no set -euo pipefail"; rc=1; }
        ;;
    esac
  done
  return "$rc"
}
check "shell scripts: bash, set -euo pipefail" strict_mode "${scripts[@]}"

# ---- terraform -----------------------------------------------------------------

check "terraform fmt -check -recursive deploy/terraform" terraform fmt -check -recursive -diff deploy/terraform
check "terraform facts (test_terraform.py)" "$PYTHON" "$TESTS/test_terraform.py"

# ---- gcloud scripts ------------------------------------------------------------

check "gcloud scripts: dry run + real gcloud parse (test_gcloud.py)" "$PYTHON" "$TESTS/test_gcloud.py"

# ---- startup scripts, image, systemd --------------------------------------------

check "startup/shutdown scripts against stubs (test_startup.py)" "$PYTHON" "$TESTS/test_startup.py"
check "Dockerfile structure (test_dockerfile.py)" "$PYTHON" "$TESTS/test_dockerfile.py"

verify_units() {
  # verify needs the ExecStart binaries: check copies that point at stand-ins.
  local dir="$WORK/units" unit line out
  mkdir -p "$dir"
  for unit in ws-lb ws-shard; do
    printf '#!/bin/sh\nexit 0\n' >"$dir/$unit"
    chmod +x "$dir/$unit"
    grep -q "^ExecStart=/usr/local/bin/$unit " "$DEPLOY/systemd/$unit.service" ||
      { echo "$unit.service: ExecStart is not /usr/local/bin/$unit"; return 1; }
    sed "s#^ExecStart=/usr/local/bin/$unit #ExecStart=$dir/$unit #" "$DEPLOY/systemd/$unit.service" >"$dir/$unit.service"
  done
  # Any message (unknown key, bad value) is a failure, not only the exit code.
  out="$(systemd-analyze verify --man=no "$dir/ws-lb.service" "$dir/ws-shard.service" 2>&1)" || { echo "$out"; return 1; }
  [[ -z "$out" ]] || { echo "$out"; return 1; }
  for unit in ws-lb ws-shard; do
    for line in "EnvironmentFile=/etc/odin-ws/$unit.env" LimitNOFILE=1048576 Restart=on-failure \
      KillSignal=SIGTERM TimeoutStopSec=45 DynamicUser=yes; do
      grep -qx "$line" "$DEPLOY/systemd/$unit.service" || { echo "$unit.service: missing $line"; return 1; }
    done
  done
}
if ! command -v systemd-analyze >/dev/null 2>&1; then
  skip "systemd-analyze verify units" "systemd-analyze not installable here"
elif ! systemd-analyze --version >/dev/null 2>&1; then
  skip "systemd-analyze verify units" "systemd-analyze does not run in this container"
else
  check "systemd-analyze verify units (+ required settings)" verify_units
fi

# ---- the topology on one machine (deploy/local) ------------------------------------

check "deploy/local reads the artefacts' values and generates a valid front (test_local.py)" "$PYTHON" "$TESTS/test_local.py"

# ---- observability ---------------------------------------------------------------

check "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules" promtool test rules deploy/prometheus/alerts_test.yml
check "promtool check config" promtool check config deploy/prometheus/prometheus.yml
check "alerts + dashboard + metric names (test_observability.py)" "$PYTHON" "$TESTS/test_observability.py"

# ---- summary ---------------------------------------------------------------------

if ((skipped > 0)); then
  printf 'deploy: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
else
  printf 'deploy: %d passed, %d failed\n' "$passed" "$failed"
fi
((failed == 0))
