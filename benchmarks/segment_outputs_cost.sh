#!/usr/bin/env bash
# The cost of writing outputs: marginal time per 12 MP photo and peak RSS of `segment` (an old checkout with its
# extension built in place vs this one, each output choice) against engine.segment. Usage: bash THIS OLD_TREE
set -u
OLD="${1:?usage: bash benchmarks/segment_outputs_cost.sh OLD_TREE (a checkout with its extension built in place)}"
R=/tmp/item10; rm -rf $R; mkdir -p $R/one $R/five
NEW="$(cd "$(dirname "$0")/.." && pwd)"; PY="$NEW/.venv/bin/python"
$PY -c "
import numpy as np; from PIL import Image
y, x = np.mgrid[0:3000, 0:4000]
for i in range(5):
    a = np.stack([(x // (7 + i)) % 256, (y // 5) % 256, ((x + y) // 11) % 256], -1).astype(np.uint8)
    Image.fromarray(a).save(f'$R/five/p{i}.jpg', quality=90)
    if i == 0: Image.fromarray(a).save('$R/one/p0.jpg', quality=90)"
$PY -c "import segformer_fast as sf; sf.Segformer.from_config('b0', num_labels=150, seed=0).save_pretrained('$R/ck')"
cat > $R/cli.py <<'PYEOF'
import sys
tree = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, tree)
import segformer_fast
assert segformer_fast.__file__.startswith(tree)
from segformer_fast.cli import main
sys.exit(main(sys.argv[2:]))
PYEOF
$PY -c "
import sys, time, resource
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; sys.path.insert(0, '$NEW')
import segformer_fast
from PIL import Image
e = segformer_fast.optimize(segformer_fast.Segformer.from_pretrained('$R/ck')); im = Image.open('$R/one/p0.jpg').convert('RGB'); e.segment(im)
ts = []
for _ in range(3): s = time.perf_counter(); e.segment(im); ts.append(time.perf_counter() - s)
print('engine.segment', round(min(ts), 3), 's; peak RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, 'MiB')"
for round in 1 2; do
  for n in one five; do
    /usr/bin/time -f "old default $n %e s %M KiB" $PY $R/cli.py "$OLD" segment $R/$n --model $R/ck --out $R/old-$n-$round --quiet 2>&1 | tail -1
    for o in labels,overlay labels labels,overlay-jpg; do
      /usr/bin/time -f "new $o $n %e s %M KiB" $PY $R/cli.py $NEW segment $R/$n --model $R/ck --out $R/new-$n-$o-$round --outputs $o --quiet 2>&1 | tail -1
    done
  done
done
