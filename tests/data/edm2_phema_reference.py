"""Writes tests/data/edm2_phema_reference.json: NVlabs/edm2's post-hoc EMA numbers for the inputs below, the
independent reference tests/test_phema.py checks dit.phema against (to 1e-10). Run by hand with edm2's
training/phema.py importable (it is not a dependency; nothing is downloaded by the tests):

    git clone https://github.com/NVlabs/edm2 /tmp/edm2 && PYTHONPATH=/tmp/edm2/training \
        python tests/data/edm2_phema_reference.py <edm2 commit>
"""

import json
import sys
from pathlib import Path

import numpy as np
import phema  # edm2's training/phema.py

CASES = [
    # (snapshot times, their widths, output time, output widths): EDM2's two tracked profiles, snapshots every
    # 250 updates of 2000; output at the end and at an earlier snapshot; uneven times; a wide and a narrow pair.
    (
        [t for t in range(250, 2001, 250) for _ in (0, 1)],
        [0.05, 0.10] * 8,
        2000,
        [0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2],
    ),
    ([t for t in range(250, 2001, 250) for _ in (0, 1)], [0.05, 0.10] * 8, 1000, [0.03, 0.05, 0.1, 0.25]),
    ([100, 100, 400, 400, 1000, 1000, 3000, 3000], [0.05, 0.10] * 4, 3000, [0.01, 0.07, 0.12]),
    ([512, 512, 1024, 1024, 4096, 4096], [0.02, 0.25] * 3, 4096, [0.05, 0.2]),
]
SIGMAS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.13, 0.2, 0.25, 0.28]


def main(commit: str) -> None:
    out = {
        "source": f"NVlabs/edm2 training/phema.py @ {commit}",
        "std_to_exp": {str(s): float(phema.std_to_exp(s)) for s in SIGMAS},
        "exp_to_std": {str(g): float(phema.exp_to_std(g)) for g in [0.5, 1.0, 6.94, 16.97, 50.0, 400.0]},
        "correlation": [
            [a_t, a_s, b_t, b_s, float(phema.power_function_correlation(np.float64(a_t), a_s, np.float64(b_t), b_s))]
            for a_t, a_s, b_t, b_s in [
                (100, 0.05, 300, 0.1),
                (300, 0.05, 100, 0.1),
                (200, 0.2, 200, 0.01),
                (1, 0.1, 7, 0.1),
            ]
        ],
        "beta": [[s, t, float(phema.power_function_beta(s, t, 1))] for s in (0.05, 0.1) for t in (1, 2, 10, 1000)],
        "coefficients": [
            {
                "in_t": a,
                "in_sigma": b,
                "out_t": c,
                "out_sigma": d,
                "x": phema.solve_posthoc_coefficients(a, b, c, d).tolist(),
            }
            for a, b, c, d in CASES
        ],
    }
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
