#!/usr/bin/env bash
# Every Molecule scenario on one set of local systemd hosts (make test-molecule; CI).
# Converging three hosts (PostgreSQL, nginx, torch on two model hosts) is the slow part, so it
# happens once: the default scenario creates, converges, checks idempotence and verifies; scale,
# failover, upgrade, backup and engines then run their verify step against the same hosts (same
# platform names, same Molecule state); the hosts are destroyed at the end, also after a failure.
#   run-scenarios.sh [SCENARIO...]   default first whatever the order; default: all but engines
#   run-scenarios.sh default engines  the move of app2 to engine vllm and back (about 11 min more:
#                                      outside CI's default set, which would pass 60 min with it)
#   ZEUS_MOLECULE_KEEP_HOSTS=1 ...     keep the hosts after a failure, to look inside them
#                                      (podman exec -it zeus-mol-app1 bash); the next run removes them
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
work_dir=$repo_root/.molecule-work
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo_root/molecule/resources/containers.conf}
export ANSIBLE_HOME=${ANSIBLE_HOME:-$work_dir/ansible-home}
# Molecule, Ansible and pip keep state under HOME: a work folder, not the user's home.
export HOME=$work_dir/home
export XDG_CACHE_HOME=$work_dir/cache
export PATH=$repo_root/.venv/bin:$PATH
export HF_HUB_OFFLINE=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0
mkdir -p "$HOME" "$XDG_CACHE_HOME" "$ANSIBLE_HOME" "$work_dir/logs"

# engines last: should its move to vLLM fail half-way, the others have already run on builtin.
all_scenarios=(default scale failover upgrade backup engines)
ci_scenarios=(default scale failover upgrade backup)
requested=("${@:-${ci_scenarios[@]}}")
for scenario in "${requested[@]}"; do
    [[ -f molecule/$scenario/molecule.yml ]] \
        || { echo "unknown scenario '$scenario'; choose from: ${all_scenarios[*]}" >&2; exit 2; }
done

# Each scenario keeps its Molecule state (inventory, generated ansible.cfg) in its own folder;
# the hosts those inventories name are the same.
scenario_molecule() { # SCENARIO ACTION
    MOLECULE_EPHEMERAL_DIRECTORY=$work_dir/ephemeral/$1 molecule "$2" -s "$1"
}

declare -a summary=()
phase_started=0
phase() { # NAME COMMAND...: runs a step and records how long it took
    local name=$1 rc=0
    shift
    printf '\n==> %s\n' "$name"
    phase_started=$(date +%s)
    "$@" || rc=$?
    summary+=("$(printf '%-28s %5d s  %s' "$name" $(($(date +%s) - phase_started)) "$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")")")
    return $rc
}

remove_hosts() {
    local host
    for host in zeus-mol-lb zeus-mol-app1 zeus-mol-app2; do
        if podman container exists "$host"; then podman rm --force --time 5 "$host" >/dev/null; fi
    done
    if podman network exists zeus-molecule; then podman network rm zeus-molecule >/dev/null; fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc != 0 && ${ZEUS_MOLECULE_KEEP_HOSTS:-0} == 1 ]]; then
        echo "keeping the hosts (ZEUS_MOLECULE_KEEP_HOSTS=1): zeus-mol-lb zeus-mol-app1 zeus-mol-app2" >&2
    else
        phase "destroy" scenario_molecule default destroy || true
        # Molecule forgets hosts whose creation failed half-way; they must not outlive the run.
        remove_hosts
    fi
    printf '\n==> Molecule durations\n'
    printf '  %s\n' "${summary[@]}"
    printf '  %-28s %5d s  %s\n' total $(($(date +%s) - run_started)) "$([[ $rc == 0 ]] && echo ok || echo FAILED)"
    exit "$rc"
}

run_started=$(date +%s)
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ -f models/smollm2-135m-instruct/config.json ]] \
    || { echo "models/smollm2-135m-instruct is missing: run 'make setup' first" >&2; exit 1; }
ls build/wheelhouse/zeus-*.whl >/dev/null 2>&1 \
    || { echo "build/wheelhouse has no zeus wheel: run 'make wheelhouse' first" >&2; exit 1; }

# Hard links: instant, and `make wheelhouse` replaces files rather than rewriting them in place.
export ZEUS_MOLECULE_WHEELHOUSE=$work_dir/build/wheelhouse
rm -rf "$ZEUS_MOLECULE_WHEELHOUSE"
mkdir -p "$(dirname "$ZEUS_MOLECULE_WHEELHOUSE")"
cp -al build/wheelhouse "$ZEUS_MOLECULE_WHEELHOUSE" 2>/dev/null || cp -a build/wheelhouse "$ZEUS_MOLECULE_WHEELHOUSE"

phase "image" bash molecule/resources/build-image.sh
# Leftovers of an interrupted run would make create fail or, worse, test stale hosts.
remove_hosts
rm -rf "$work_dir/ephemeral"
# create also runs prepare (molecule/resources/prepare.yml: wait for systemd to finish booting).
phase "default: create" scenario_molecule default create
phase "default: converge" scenario_molecule default converge
phase "default: idempotence" scenario_molecule default idempotence
phase "default: verify" scenario_molecule default verify
failed_scenarios=()
for scenario in "${requested[@]}"; do
    [[ $scenario == default ]] && continue
    # One scenario's failure does not hide the others' results.
    phase "$scenario: verify" scenario_molecule "$scenario" verify || failed_scenarios+=("$scenario")
done
if ((${#failed_scenarios[@]})); then
    echo "failed scenarios: ${failed_scenarios[*]} (logs of the playbooks they ran: .molecule-work/logs/)" >&2
    exit 1
fi
