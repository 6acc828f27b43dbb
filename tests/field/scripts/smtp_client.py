"""Field client: smtplib, one session, one message per operation.

    python smtp_client.py HOST PORT RCPT

After an error the application drops the session and opens a new one at the next
message (a failed connect fails that operation). The Subject is the key.
"""
import smtplib
import sys

from fieldops import run

host, port, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
smtp: smtplib.SMTP | None = None


def op(key: str) -> None:
    global smtp
    if smtp is None:
        smtp = smtplib.SMTP(host, port, timeout=5)
    refused = smtp.sendmail("field@field.test", [rcpt],
                            f"From: field@field.test\r\nTo: {rcpt}\r\nSubject: {key}\r\n"
                            f"Message-ID: <{key}@field.test>\r\n\r\nmessage {key}\r\n")
    if refused:
        raise smtplib.SMTPRecipientsRefused(refused)


def on_error() -> None:
    global smtp
    if smtp is not None:
        smtp.close()
    smtp = None


run(op, on_error=on_error, pace=0.01)
