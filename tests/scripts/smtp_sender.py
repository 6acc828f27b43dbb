"""Legacy: send readings by mail with smtplib, one SMTP session per mail."""
import smtplib
import sys

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.sendmail("robot@example.test", ["ops@example.test"],
                      f"Subject: reading {i}\r\n\r\nreading {i}\r\n")
print(f"smtp: {count} ok")
