"""CLI: python -m simulations.phantom --out DIR --studies N --seed S [--size PIXELS] [--held-out FRACTION]
[--finding-contrast FACTOR]."""
import argparse
import time

from . import generate_phantom


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.phantom", description=__doc__)
    parser.add_argument("--out", required=True, help="folder to create (absent or empty)")
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="image height in pixels (width is 85-100 %% of it)")
    parser.add_argument("--held-out", type=float, default=0.1,
                        help="share of patients in the test split, and as many in validate (default 0.1)")
    parser.add_argument("--finding-contrast", type=float, default=1.0,
                        help="multiplies every finding's density (default 1.0, the calibrated subtle look)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_phantom(args.out, args.studies, args.seed, size=args.size, progress=True,
                               held_out=args.held_out, finding_contrast=args.finding_contrast)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"phantom: {args.studies} studies (seed {args.seed}) written to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
