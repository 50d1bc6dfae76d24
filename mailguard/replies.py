"""Every reply the gateway itself sends, in one table.

Each reply carries its RFC 3463 enhanced status code.  Inspectors refer to
replies by name so the wording lives in one place.
"""

REPLIES = {
    # Session set-up and tear-down.
    "backend_unreachable": b"421 4.4.1 Service not available: mail server unreachable, closing connection\r\n",
    "backend_lost": b"421 4.4.2 Connection to the mail server lost, closing connection\r\n",
    "backend_lost_data": b"451 4.3.0 Connection to the mail server lost, message not delivered\r\n",
    "synwait_timeout": b"421 4.4.2 Connection set-up timeout, closing connection\r\n",
    "idle_timeout": b"421 4.4.2 Idle timeout, closing connection\r\n",
    "command_timeout": b"421 4.4.2 Command timeout, closing connection\r\n",
    "data_rate": b"421 4.4.2 Message data too slow, closing connection\r\n",
    "try_later": b"421 4.7.0 Too many connections, try again later\r\n",
    "closing": b"421 4.4.2 Closing connection\r\n",
    # Message size.
    "max_data": b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
    # Command syntax and sequence.
    "line_too_long": b"500 5.5.2 Line too long\r\n",
    "bad_sequence": b"503 5.5.1 Bad sequence of commands\r\n",
    "too_many_recipients": b"452 4.5.3 Too many recipients\r\n",
    "too_many_errors": b"421 4.7.0 Too many errors, closing connection\r\n",
    "sync": b"554 5.5.0 Error: SMTP protocol synchronization\r\n",
    "queue_overflow": b"421 4.7.0 Too many pipelined commands, closing connection\r\n",
    # Hardening.
    "pregreet": b"554 5.5.1 Error: protocol error: data sent before greeting\r\n",
    "non_smtp": b"221 2.7.0 Error: non-SMTP command\r\n",
    "bare_newline_data": b"550 5.5.2 bare <CR> or <LF> received\r\n",
    "nul_data": b"550 5.5.2 NUL received in message data\r\n",
    "bare_newline_command": b"500 5.5.2 Error: bare <CR> or <LF> received\r\n",
    "invalid_reply": b"421 4.4.0 Invalid reply from the mail server, closing connection\r\n",
    # TLS.
    "auth_needs_tls": b"530 5.7.0 Must issue a STARTTLS command first\r\n",
    "tls_not_available": b"454 4.7.0 TLS not available\r\n",
    "tls_ready": b"220 2.0.0 Ready to start TLS\r\n",
    "tls_again": b"503 5.5.1 TLS already active\r\n",
    "starttls_injection": b"554 5.5.0 Error: pipelining after STARTTLS, closing connection\r\n",
    "backend_tls_failed": b"421 4.7.0 TLS to the mail server failed, closing connection\r\n",
    "backend_tls_missing": b"421 4.7.0 TLS required but not offered by the mail server, closing connection\r\n",
    "backend_injection": b"421 4.7.0 Invalid data from the mail server after STARTTLS, closing connection\r\n",
    # Message filters (the server has seen nothing of the message yet).
    "start_input": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    "no_valid_recipients": b"554 5.5.1 Error: no valid recipients\r\n",
    "need_mail": b"503 5.5.1 Error: need MAIL command\r\n",
    "chunk_received": b"250 2.0.0 Chunk received\r\n",
    "discarded": b"250 2.0.0 Ok: message accepted\r\n",
    "quarantined": b"250 2.0.0 Ok: message accepted\r\n",
    "policy_drop": b"421 4.7.1 Connection closed by policy\r\n",
    "filter_failed_delivery": b"451 4.3.0 Message not delivered, try again later\r\n",
    # Milters answering without a reply code of their own (Postfix's wording).
    "milter_reject": b"550 5.7.1 Command rejected\r\n",
    "milter_tempfail": b"451 4.7.1 Service unavailable - try again later\r\n",
    "milter_shutdown": b"421 4.7.0 Server closing connection\r\n",
    # Content rules ([match NAME] sections).
    "policy_sender": b"550 5.7.1 Sender rejected by policy\r\n",
    "policy_recipient": b"550 5.7.1 Recipient rejected by policy\r\n",
    "policy_command": b"550 5.7.1 Command rejected by policy\r\n",
    "policy_message": b"550 5.7.1 Message rejected by policy\r\n",
    "policy_rate": b"450 4.7.1 Rate limit exceeded\r\n",
}


def reply(name):
    """Return the bytes of the gateway's own reply called ``name``."""
    return REPLIES[name]
