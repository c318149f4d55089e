"""python -m scheduler_svc --redis-url URL --workers host:port,... --port 50051"""
import asyncio
import logging

from .config import SchedulerConfig
from .server import serve


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(SchedulerConfig.from_args(argv)))


if __name__ == "__main__":
    main()
