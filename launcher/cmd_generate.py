"""`caraserve generate`: a NATS client that streams one completion to the terminal.

It logs in with ``--creds`` (``caraserve up --nats-client-creds FILE`` writes one). Ctrl-C
cancels the request with the cancel token its first chunk brought, or, before that chunk, with
its ``--api-key`` (a key of the request's tenant is proof enough where API keys are configured).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from launcher.cli import CliError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream a completion over NATS")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    p.add_argument("--model", default="", help="base model name when no adapter is given (default: ask the gateway)")
    p.add_argument("--nats", default="nats://127.0.0.1:4222",
                   help="NATS server URL (or a comma-separated list of cluster nodes)")
    p.add_argument("--creds", default="", help="NATS client credentials file (caraserve up --nats-client-creds "
                                               "FILE writes one); default: CARASERVE_NATS_USER/PASSWORD, else none")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the whole answer")
    p.set_defaults(func=run)


async def connect(args: argparse.Namespace):
    """A NATS connection logged in with ``--creds`` (or the CARASERVE_NATS_* variables)."""
    import nats

    from shared.bus import server_list
    from shared.nats_auth import CredentialsError, load_credentials

    try:
        credentials = load_credentials(args.creds)
        login = credentials.connect_options() if credentials is not None else {}
        return await nats.connect(server_list(args.nats), connect_timeout=5, max_reconnect_attempts=0, **login)
    except CredentialsError as exc:
        raise CliError(str(exc)) from None
    except (OSError, ValueError, nats.errors.Error) as exc:
        raise CliError(f"cannot reach NATS at {args.nats}: {exc}") from None


def make_request(args: argparse.Namespace):
    from shared.schemas import ChatMessage, GenerateRequest

    return GenerateRequest(model=args.adapter or args.model or "default", prompt=None if args.chat else args.prompt,
                           messages=[ChatMessage(role="user", content=args.prompt)] if args.chat else None,
                           max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                           request_id=f"cli-{uuid.uuid4().hex[:12]}", api_key=args.api_key)


async def stream(args: argparse.Namespace) -> int:
    """Send the request, print its chunks until the final one; Ctrl-C cancels it (with the token of
    its first chunk, or with the API key before that chunk arrived)."""
    import nats

    from shared import subjects
    from shared.schemas import CancelRequest, Chunk, SchemaError

    nc = await connect(args)
    request = make_request(args)
    cancel_token: str | None = None  # the first chunk brings it
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subjects.GENERATE, request.encode(), reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=args.timeout)
            try:
                chunk = Chunk.decode(msg.data)
            except SchemaError as exc:
                raise CliError(f"bad reply: {exc}") from None
            cancel_token = cancel_token or chunk.cancel_token
            print(chunk.text, end="", flush=True)
            if chunk.final:
                return report_final(chunk)
    except nats.errors.TimeoutError:
        raise CliError(f"no answer within {args.timeout:.0f} s") from None
    except asyncio.CancelledError:  # Ctrl-C: the gateway stops the request (only its requester may)
        if cancel_token is not None or args.api_key:  # before the first chunk, the API key is the proof
            cancel = CancelRequest(request_id=request.request_id, cancel_token=cancel_token, api_key=args.api_key)
            await nc.publish(subjects.CANCEL, cancel.encode())
            await nc.flush(timeout=2)
        raise
    finally:
        await nc.close()


def report_final(chunk) -> int:
    """End the output line; an error chunk becomes a CliError, otherwise print the usage."""
    print()
    if chunk.error is not None:
        raise CliError(f"{chunk.error.code}: {chunk.error.message}")
    usage = chunk.usage
    print(f"[{chunk.finish_reason}; {usage.prompt_tokens if usage else '?'} prompt + "
          f"{usage.completion_tokens if usage else '?'} completion tokens]", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(stream(args))
