#!/usr/bin/env bash
# Preemption for the GPU recipes (sourced): a scheduler's exit signal ends a launch with a saved checkpoint and
# exit status 0.
#
# Slurm's `#SBATCH --signal=USR1@300` (no B:) signals every process of the job step five minutes before its end:
# this shell, torchrun and the workers. This shell ignores the signal (a shell killed by it would end the step
# mid-save); torchrun >= 2.9 forwards the signals of its --signals-to-handle, set here through PET_SIGNALS_TO_HANDLE
# (an exported TORCHELASTIC_SIGNALS_TO_HANDLE is overwritten by the launcher), and waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before its SIGKILL; the workers finish the step, save and exit 0, and the
# trainer records the clean stop in SAVE/last_exit.json. torchrun itself then exits 1 (it re-raises the signal);
# run_training turns that into 0 when the trainer recorded a clean stop during this launch, so `afterok` job chains
# and srun --kill-on-bad-exit see success. Older torchruns die of SIGUSR1: the trainer warns at start-up; use
# EXIT_SIGNAL=SIGTERM with --signal=TERM@300 there.
#
# Environment: EXIT_SIGNAL (SIGUSR1), PET_SIGNALS_TO_HANDLE, TORCH_ELASTIC_SHUTDOWN_TIMEOUT (600).

EXIT_SIGNAL="${EXIT_SIGNAL:-SIGUSR1}"
trap '' "${EXIT_SIGNAL#SIG}"
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,${EXIT_SIGNAL}}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

# run_training SAVE_DIR COMMAND...: run a training launch; its status, or 0 after a clean stop it recorded.
run_training() {
  local save="$1"; shift
  local stamp rc=0
  stamp="$(mktemp)"
  "$@" || rc=$?
  if [ "$rc" -ne 0 ] && [ -f "$save/last_exit.json" ] && [ "$save/last_exit.json" -nt "$stamp" ]; then
    echo "launcher exited with status $rc after the trainer stopped cleanly: $(cat "$save/last_exit.json")" >&2
    rc=0
  fi
  rm -f "$stamp"
  return "$rc"
}
