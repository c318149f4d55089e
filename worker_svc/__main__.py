"""python -m worker_svc --backend torch|sim --model PATH --port N"""
import asyncio
import logging

from .config import WorkerConfig
from .service import serve


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(WorkerConfig.from_args(argv)))


if __name__ == "__main__":
    main()
