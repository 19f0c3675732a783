#!/bin/sh
# A QEMU "machine in a lab", for the lab-target test in CI: the only ways
# in are the ones a real lab has. `on` starts QEMU in the background with
# its serial port on a TCP port (as ser2net serves a real one), `off` kills
# it (a power cut), `flash` copies the image onto its disk. qlab runs these
# through qemu-lab.toml and never learns that the machine is a VM.
#
# QLAB_WORK is the directory qlab keeps for the target; QLAB_IMAGE is the
# image to flash; QLAB_CONSOLE_ADDR is the free port qlab picked for the
# serial console (qemu-lab.toml asks for port 0). The VM has no command
# channel of its own: like a lab machine, only its serial line.
set -eu
work=${QLAB_WORK:?run by qlab}
pidfile="$work/qemu.pid"

off() {
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill -9 "$pid" 2>/dev/null || true
    # Wait until it is gone (or a zombie nobody reaps), so the next power
    # on finds the disk and the port free.
    i=0
    while [ $i -lt 100 ] && kill -0 "$pid" 2>/dev/null; do
        grep -q ') Z' "/proc/$pid/stat" 2>/dev/null && break
        sleep 0.1
        i=$((i + 1))
    done
    rm -f "$pidfile"
}

case ${1:-} in
on)
    off
    exec qvm --work-dir "$work/vm" --serial-tcp "${QLAB_CONSOLE_ADDR:?run by qlab}" --no-command-channel \
        --detach "$pidfile" "$work/disk.img"
    ;;
off)
    off
    ;;
flash)
    cp --sparse=always "${QLAB_IMAGE:?no image}" "$work/disk.img"
    ;;
*)
    echo "usage: $0 on|off|flash" >&2
    exit 2
    ;;
esac
