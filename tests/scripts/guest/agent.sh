#!/bin/sh
# The guest agent: runs commands the host test sends over the second serial port (ttyS1) and
# reports their output and exit status. ttyS0 stays the kernel console, so console noise never
# mixes into this channel. Started by the initramfs' /init inside the chroot (host root over
# 9p + tmpfs overlay) with the host's /bin/sh; the host side is tests/src/qemu.rs.
#
# Protocol: one line per message, '\n'-terminated, no echo (the port is in raw mode).
#   guest → host  AGENT READY <uptime seconds>      once, when commands are accepted
#   host → guest  RUN <id> <command line>            <id>: a token without spaces
#   host → guest  RUN64 <id> <base64 of a script>    the same for text with newlines
#   guest → host  OUT <id> <line>                    each output line (stdout and stderr merged)
#   guest → host  END <id> <exit status>             after the command and its output ended
#   host → guest  POWEROFF                           agent syncs, says BYE and exits; /init
#   guest → host  BYE                                then powers off (QEMU exits: -no-reboot)
#   guest → host  ERR <text>                         a line the agent did not understand
# Commands run one at a time with `sh -c` in /, stdin from /dev/null. END waits until every
# writer of the output pipe is gone: a command that leaves a process running in the background
# must redirect that process's stdout and stderr (e.g. `daemon >/tmp/d.log 2>&1 &`).
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export CUSEDEV_GUEST=1

chan=/dev/ttyS1
status_file=/run/cusedev-agent.status

# raw: no line editing, no CR/LF translation, no signals from bytes; -echo: the host must not
# read its own commands back.
stty -F "$chan" raw -echo || { echo "agent: cannot put $chan in raw mode" >&2; exit 1; }
exec <"$chan" >"$chan"
cd /

read -r up _ </proc/uptime
echo "AGENT READY $up"

while IFS= read -r line; do
    verb=${line%% *}
    rest=${line#"$verb"}
    rest=${rest# }
    case $verb in
    RUN | RUN64)
        id=${rest%% *}
        cmd=${rest#"$id"}
        cmd=${cmd# }
        if [ -z "$id" ]; then
            echo "ERR RUN without an id"
            continue
        fi
        if [ "$verb" = RUN64 ] && ! cmd=$(printf '%s' "$cmd" | base64 -d); then
            echo "OUT $id agent: the RUN64 payload is not valid base64"
            echo "END $id 125"
            continue
        fi
        # The status is written from inside the pipeline's subshell, hence the file; only
        # builtins around the command (`:`, read), as every exec costs under TCG. awk adds the
        # prefix and flushes per line so a long command's output streams to the host.
        : >"$status_file"
        { sh -c "$cmd" </dev/null 2>&1; echo $? >"$status_file"; } |
            awk -v prefix="OUT $id " '{ print prefix $0; fflush() }'
        status=""
        read -r status <"$status_file" || true
        echo "END $id ${status:-125}"
        ;;
    POWEROFF)
        sync
        echo BYE
        exit 0
        ;;
    "") ;;
    *) echo "ERR unknown request: $verb" ;;
    esac
done
echo "agent: $chan closed" >&2
