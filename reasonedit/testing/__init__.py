"""Stand-ins for outside paid services, as real servers on loopback, for tests and benches."""

from reasonedit.testing.chat_server import ChatRequest, Reply, ScriptedChatServer

__all__ = ["ChatRequest", "Reply", "ScriptedChatServer"]
