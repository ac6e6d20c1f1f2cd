#!/usr/bin/env bash
# Builds the worker image from the Dockerfile without a Docker daemon (buildah, vfs storage, chroot
# isolation: what a CI runner without privileges has), then runs its default command.
#
#   scripts/build-image.sh                 FROM the Dockerfile's base (vllm/vllm-openai), from a registry
#   scripts/build-image.sh --debian-base   FROM a base built here from Debian's packages (debootstrap):
#                                          for machines that reach Debian's mirror and PyPI but no registry
#
# The Debian base has Python and pip but no vLLM or CUDA: the image it gives runs the echo and sim
# engines, which is what the default command is run with here (examples/laptop.yaml's control
# variant against the broker at $ABQ_BOOTSTRAP_SERVERS, default 127.0.0.1:9092), answering one request
# that a second container of the image submits.
# Needs root (or a user namespace), buildah, and for --debian-base debootstrap.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
log() { echo "[image] $*" >&2; }
for tool in buildah; do
    command -v "$tool" > /dev/null || { log "$tool is not installed (Debian: apt-get install $tool)"; exit 3; }
done

args=()
if [ "${1:-}" = --debian-base ]; then
    command -v debootstrap > /dev/null || { log "debootstrap is not installed (Debian: apt-get install debootstrap)"; exit 3; }
    base=localhost/abqueue-debian-base:bookworm
    if ! buildah inspect --type image "$base" > /dev/null 2>&1; then
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        log "debootstrap: Debian bookworm with Python 3.11 and pip into $rootfs (a few minutes)"
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
            bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$rootfs.log" 2>&1 \
            || { tail -5 "$rootfs.log" >&2; exit 1; }
        # The CAs this machine adds to Debian's (a proxy's, a company's): the base is built for this
        # network, and pip inside the build reaches PyPI through it.
        if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates > /dev/null
        fi
        ctr=$(buildah from scratch)
        mnt=$(buildah mount "$ctr")
        cp -a "$rootfs"/. "$mnt"/
        buildah umount "$ctr" > /dev/null
        # Debian marks its Python as externally managed; an image is the one place that owns it.
        buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --cmd /bin/bash "$ctr"
        buildah commit --rm "$ctr" "$base" > /dev/null
        log "base image $base"
    fi
    args+=(--build-arg "VLLM_IMAGE=$base")
fi

log "building abqueue-worker from $root/Dockerfile"
start=$SECONDS
buildah build --format docker --layers=false "${args[@]}" -t localhost/abqueue-worker:dev "$root" >&2  # docker: keeps HEALTHCHECK
log "built localhost/abqueue-worker:dev in $((SECONDS - start)) s"

# The default command (ENTRYPOINT + CMD), with the config it expects at /etc/abqueue/experiment.yaml.
ctr=$(buildah from localhost/abqueue-worker:dev)
trap 'buildah rm "$ctr" > /dev/null 2>&1 || true' EXIT
buildah copy --chown 10001:10001 "$ctr" "$root/examples/laptop.yaml" /etc/abqueue/experiment.yaml > /dev/null
mapfile -t command < <(buildah inspect --type image localhost/abqueue-worker:dev \
    | python3 -c "import json, sys; c = json.load(sys.stdin)['OCIv1']['config']; print(*c['Entrypoint'], *c['Cmd'], sep='\n')")
log "default command: ${command[*]}"
bootstrap=${ABQ_BOOTSTRAP_SERVERS:-127.0.0.1:9092}
buildah run --user 10001 --env ABQ_BOOTSTRAP_SERVERS="$bootstrap" "$ctr" -- "${command[@]}" &
worker=$!
# A request to the control variant (user-1 is assigned to it), sent from a second container of the
# same image, answered by the worker above.
client=$(buildah from localhost/abqueue-worker:dev)
trap 'kill -TERM $worker 2> /dev/null || true; buildah rm "$ctr" "$client" > /dev/null 2>&1 || true' EXIT
buildah copy "$client" "$root/examples/laptop.yaml" /etc/abqueue/experiment.yaml > /dev/null
answer=$(buildah run --user 10001 --env ABQ_BOOTSTRAP_SERVERS="$bootstrap" "$client" -- \
    abq submit --config /etc/abqueue/experiment.yaml --routing-key user-1 --prompt "hello from the image" --timeout 60)
echo "$answer"
kill -TERM $worker
wait $worker || true
log "the image's default command served: $(python3 -c "import json, sys; r = json.loads(sys.argv[1]); print(r['variant'], r['model'], r['outputs'])" "$answer")"
