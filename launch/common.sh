# Sourced by the launchers: check the arguments and set STAGE, CONFIG and the remaining overrides.
if [ $# -lt 2 ]; then
    echo "usage: $0 STAGE CONFIG [key=value ...]   (STAGE is 0, 1, 2, 3 or rl)" >&2
    exit 2
fi
STAGE=$1 CONFIG=$2
