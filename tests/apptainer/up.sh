#!/usr/bin/env bash
# A real Apptainer for the container tests: Debian sid's apptainer package, unmodified, on a Debian machine whose own
# release has none (bookworm) or whose glibc is too old for sid's binary (bookworm's 2.36; it needs 2.38). As root:
#   1. debootstrap a minimal Debian trixie root into ROOT (about 1 min, 215 MB) and install apptainer (and debootstrap,
#      for `Bootstrap: debootstrap` definitions) there from sid (about 35 s);
#   2. write `apptainer` and `singularity` into BIN_DIR: per call they make a private mount namespace, bind /proc, /sys,
#      /dev and the host folders that jobs use (HOST_DIRS) into ROOT at the same paths, pivot_root into it and exec
#      ROOT's apptainer in the caller's folder and environment. pivot_root, not chroot: apptainer's starter re-joins
#      its own mount namespace, which escapes a chroot ("Running inside a weak chrooted environment"). Every step
#      execs, so the wrapper's PID is apptainer's and signals sent to it reach apptainer. Nothing stays mounted.
#   3. where root lacks capabilities (CAP_SYS_RESOURCE on some test machines), root's containers ask only for those it
#      has ("root default capabilities = file"): otherwise every `apptainer exec` as root fails with "Requesting
#      capability set 0x1ffffffffff while permitted capability set is ...". A %post asks for every capability
#      regardless: builds run with --fakeroot (a user namespace holds them all), which needs root's range in
#      /etc/subuid and /etc/subgid.
# Idempotent: a few minutes the first time, a second after that.
#   bash tests/apptainer/up.sh                                     # ROOT=/opt/hpclora-apptainer, commands in /usr/local/bin
#   APPTAINER_BIN_DIR=/tmp/x/bin bash tests/apptainer/up.sh /tmp/x/root
# Limits: root only (mount namespaces, pivot_root). A path outside HOST_DIRS does not exist for this apptainer: the
# wrapper then says "env: cannot change directory to ..." or apptainer "no such file". deb.debian.org's sid Release
# file can be past its Valid-Until on the mirror, hence Check-Valid-Until=false.
set -euo pipefail
ROOT=${1:-/opt/hpclora-apptainer}
BIN_DIR=${APPTAINER_BIN_DIR:-/usr/local/bin}
MIRROR=${APPTAINER_MIRROR:-http://deb.debian.org/debian}
CHECKOUT=$(cd "$(dirname "$0")/../.." && pwd)
# The folders jobs and tests use, at the same paths inside: temporary and home folders, /srv (the tests' "shared
# storage", which apptainer does not bind by itself), Slurm's spool (batch scripts), the checkout's top folder, and
# the folder of local wheels some machines have (the test image's torch comes from it).
HOST_DIRS=${APPTAINER_HOST_DIRS:-/tmp /var/tmp /home /root /srv /var/spool/slurmd /opt/wheels}
top=/$(echo "$CHECKOUT" | cut -d/ -f2)
case " $HOST_DIRS " in *" $top "*) ;; *) HOST_DIRS="$HOST_DIRS $top" ;; esac
log() { echo "apptainer-up: $*"; }
[ "$(id -u)" = 0 ] || { echo "apptainer-up: needs root (debootstrap, mount namespaces, pivot_root)" >&2; exit 1; }
ROOT=$(realpath -m "$ROOT")

if ! [ -x "$ROOT/usr/bin/apptainer" ]; then
    if ! command -v debootstrap >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    if ! [ -x "$ROOT/usr/bin/apt-get" ]; then
        log "debootstrap trixie into $ROOT"
        rm -rf "$ROOT"
        mkdir -p "$ROOT"
        debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" > "$ROOT.debootstrap.log" 2>&1 \
            || { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }
    fi
    printf 'Types: deb\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$MIRROR" > "$ROOT/etc/apt/sources.list.d/sid.sources"
    printf 'Package: *\nPin: release n=sid\nPin-Priority: 100\n' > "$ROOT/etc/apt/preferences.d/sid"
    echo 'Acquire::Check-Valid-Until "false";' > "$ROOT/etc/apt/apt.conf.d/99no-valid-until"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    log "apt-get install -t sid apptainer (in $ROOT)"
    chroot "$ROOT" apt-get update -qq
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t sid \
        apptainer debootstrap ca-certificates squashfs-tools >/dev/null
fi
mkdir -p "$ROOT/.host-root"
touch "$ROOT/etc/hosts"
grep -q '^root:' "$ROOT/etc/subuid" 2>/dev/null || echo 'root:1000000:65536' >> "$ROOT/etc/subuid"
grep -q '^root:' "$ROOT/etc/subgid" 2>/dev/null || echo 'root:1000000:65536' >> "$ROOT/etc/subgid"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"   # builds fetch packages from inside ROOT
# Where outbound TLS is re-signed by a local CA, pip in a %post needs the host's CAs: ROOT trusts them too, and builds
# bind ROOT's bundle (`hpclora container build -B /etc/ssl/certs/ca-certificates.crt`); nothing of it enters an image.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    if ! cmp -s <(cat /usr/local/share/ca-certificates/*.crt) <(cat "$ROOT"/usr/local/share/ca-certificates/*.crt 2>/dev/null); then
        cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
        chroot "$ROOT" update-ca-certificates >/dev/null 2>&1
    fi
fi

# The wrapper's inner half: runs with the host's /bin/sh in a fresh private mount namespace.
cat > "$ROOT.enter" <<ENTER
#!/bin/sh
# Written by hpclora's tests/apptainer/up.sh. Usage (by the apptainer wrapper only):
#   unshare --mount --propagation private sh THIS DIR ARGS...
set -e
R=$ROOT dir=\$1; shift
mount --bind "\$R" "\$R"                      # pivot_root needs the new root to be a mount point
mount -t proc proc "\$R/proc"
mount --rbind /sys "\$R/sys"
mount --rbind /dev "\$R/dev"
mount --bind /etc/hosts "\$R/etc/hosts"          # the host's names (the test cluster's nodes), which images get too
for d in $HOST_DIRS; do
    if [ -d "\$d" ]; then mkdir -p "\$R\$d" && mount --rbind "\$d" "\$R\$d"; fi
done
cd "\$R"
pivot_root . .host-root
umount -l /.host-root
exec /usr/bin/env -C "\$dir" /usr/bin/apptainer "\$@"
ENTER
mkdir -p "$BIN_DIR"
for name in apptainer singularity; do
    cat > "$BIN_DIR/$name.new" <<WRAP
#!/bin/sh
# Written by hpclora's tests/apptainer/up.sh: Debian sid's apptainer from $ROOT (see $ROOT.enter). exec throughout:
# this PID becomes apptainer's.
exec /usr/bin/unshare --mount --propagation private /bin/sh $ROOT.enter "\$PWD" "\$@"
WRAP
    chmod 755 "$BIN_DIR/$name.new"
    mv "$BIN_DIR/$name.new" "$BIN_DIR/$name"
done

# Capabilities: root's containers ask for those this process can hand on.
bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
if [ "$((0x$bnd))" -ne "$((0x1ffffffffff))" ] && ! grep -q '^root default capabilities = file' "$ROOT/etc/apptainer/apptainer.conf"; then
    caps="CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE
          NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN
          SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE
          MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
    keep="" i=0
    for c in $caps; do
        if [ $(( (0x$bnd >> i) & 1 )) = 1 ]; then keep="$keep${keep:+,}CAP_$c"; else log "this process lacks CAP_$c: containers run without it"; fi
        i=$((i + 1))
    done
    "$BIN_DIR/apptainer" capability add --user root "$keep" >/dev/null 2>&1
    sed -i 's/^root default capabilities = .*/root default capabilities = file/' "$ROOT/etc/apptainer/apptainer.conf"
fi
log "$("$BIN_DIR/apptainer" --version) as $BIN_DIR/apptainer and $BIN_DIR/singularity (root $ROOT; host folders: $HOST_DIRS)"
