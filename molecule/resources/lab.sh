#!/usr/bin/env bash
# The local lab: three Debian bookworm hosts with systemd (rootful podman), deployed by
# playbooks/site.yml with inventory/lab, Zeus published on the controller's 127.0.0.1:8081.
#   lab.sh up     build or reuse the image, start the hosts, converge, print the URL and login
#   lab.sh down   remove the hosts and their network (secrets in .lab/ stay for the next up)
#   lab.sh hosts  only start the hosts (no converge): for working on the roles
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo_root/molecule/resources/containers.conf}
export ANSIBLE_HOME=${ANSIBLE_HOME:-$repo_root/.molecule-work/ansible-home}
export HF_HUB_OFFLINE=1

image=localhost/zeus-bookworm-systemd
network=zeus-lab
lb_host=zeus-lab-lb
model_hosts=(zeus-lab-app1 zeus-lab-app2)
published_port=8081
secrets_dir=$repo_root/.lab/secrets
# inventory/lab/group_vars/model_servers/main.yml creates this account.
admin_email=admin@example.org
venv_bin=$repo_root/.venv/bin
fresh_hosts=()

log() { printf '[lab] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

start_host() { # NAME [podman run options...]; records in fresh_hosts the hosts it (re)started
    local name=$1
    shift
    if podman container exists "$name"; then
        if [[ $(podman container inspect --format '{{ .State.Running }}' "$name") != true ]]; then
            podman start "$name" >/dev/null
            fresh_hosts+=("$name")
        fi
        return
    fi
    podman run --detach --quiet --name "$name" --hostname "$name" --network "$network" \
        --systemd=always --label zeus.lab=true "$@" "$image" /lib/systemd/systemd >/dev/null
    fresh_hosts+=("$name")
}

wait_for_boot() {
    local name=$1 state
    # --wait returns once systemd has finished booting; "degraded" means a unit failed.
    state=$(timeout 120 podman exec "$name" systemctl is-system-running --wait 2>/dev/null || true)
    [[ $state == running ]] && return
    podman exec "$name" systemctl --failed --no-pager >&2 || true
    # A host that was already up may list a Zeus unit that failed earlier: site.yml deals with it.
    if [[ " ${fresh_hosts[*]} " == *" $name "* ]]; then
        die "$name: systemd says '${state:-no answer}' instead of 'running' after booting (failed units above)"
    fi
    log "warning: $name says '${state:-no answer}' (failed units above); converging anyway"
}

generate_secrets() {
    # inventory/lab/group_vars/all/vault.yml reads these files (and would create them itself on
    # a first direct ansible-playbook run); making them here keeps their creation in one place.
    local name length
    mkdir -p "$secrets_dir"
    chmod 0700 "$secrets_dir"
    for name in db_password:32 secret_key:48 admin_password:20; do
        length=${name#*:}
        name=${name%%:*}
        [[ -s $secrets_dir/$name ]] && continue
        (umask 077 && "$venv_bin/python" -c \
            "import secrets, string, sys; a = string.ascii_letters + string.digits; print(''.join(secrets.choice(a) for _ in range(int(sys.argv[1]))))" \
            "$length" >"$secrets_dir/$name")
        log "generated ${secrets_dir#"$repo_root"/}/$name"
    done
}

lab_up() {
    for tool in podman "$venv_bin/ansible-playbook"; do
        command -v "$tool" >/dev/null || die "$tool is missing; run 'make system-deps' and 'make setup'"
    done
    bash molecule/resources/build-image.sh
    podman network exists "$network" || podman network create "$network" >/dev/null
    start_host "$lb_host" --publish "127.0.0.1:$published_port:$published_port"
    for host in "${model_hosts[@]}"; do
        start_host "$host"
    done
    for host in "$lb_host" "${model_hosts[@]}"; do
        wait_for_boot "$host"
    done
    log "hosts running: $lb_host (lb, db), ${model_hosts[*]} (model_servers)"
    [[ ${1:-} == hosts-only ]] && return
    generate_secrets
    local started
    started=$(date +%s)
    "$venv_bin/ansible-playbook" -i inventory/lab playbooks/site.yml
    log "converged in $(($(date +%s) - started)) s"
    cat <<DONE

Zeus is running at http://localhost:$published_port
  admin login: $admin_email / $(cat "$secrets_dir/admin_password")
  (lab secrets in ${secrets_dir#"$repo_root"/}/; 'make lab-down' removes the hosts)
DONE
}

lab_down() {
    local host
    for host in "$lb_host" "${model_hosts[@]}"; do
        podman container exists "$host" && podman rm --force --time 10 "$host" >/dev/null
    done
    podman network exists "$network" && podman network rm "$network" >/dev/null
    log "lab hosts removed"
}

case ${1:-} in
    up) lab_up ;;
    hosts) lab_up hosts-only ;;
    down) lab_down ;;
    *) die "usage: $0 up|down|hosts (got '${1:-}')" ;;
esac
