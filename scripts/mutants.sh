#!/usr/bin/env bash
# mutants.sh: proof that the simulator bites. Each patch in
# relay/testdata/mutants breaks one guarantee of the engine on purpose; for
# each, on a copy of the tree, the simulator runs seeds until one fails and
# says how many it took. A mutant it does not catch, or a patch that no
# longer applies, fails the script.
#
#   scripts/mutants.sh              # every mutant, up to 20,000 seeds each
#   SEEDS=100000 scripts/mutants.sh sweep-ordered-by-id
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seeds="${SEEDS:-20000}"
cd "$root"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
	for p in relay/testdata/mutants/*.patch; do names+=("$(basename "$p" .patch)"); done
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
for name in "${names[@]}"; do
	patch="$root/relay/testdata/mutants/$name.patch"
	tree="$work/$name"
	mkdir -p "$tree"
	# The files of the working tree, committed or not (ignored ones left out).
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
	if ! (cd "$tree" && patch -p1 --quiet --no-backup-if-mismatch <"$patch"); then
		echo "mutant $name: the patch no longer applies; update $patch"
		failed=1
		continue
	fi
	began=$(date +%s)
	out="$(cd "$tree" && go test ./relay/ -run '^TestSimulation$' -count=1 -v -seeds="$seeds" -sim-stop 2>&1 || true)"
	took=$(($(date +%s) - began))
	if line="$(grep -m1 '^sim: first failing seed' <<<"$out")"; then
		why="$(grep -m1 -o 'seed [0-9]*: .*' <<<"$out" | cut -c1-160)"
		echo "mutant $name: caught (${line#sim: }, ${took}s): $why"
	elif grep -q '^sim: ' <<<"$out"; then
		echo "mutant $name: NOT caught in $seeds seeds"
		failed=1
	else
		echo "mutant $name: the simulator did not run:"
		tail -20 <<<"$out"
		failed=1
	fi
done
exit "$failed"
