"""Legacy: upload readings with ftplib, one FTP session per file, and read each one back."""
import ftplib
import io
import sys

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    ftp = ftplib.FTP()
    ftp.connect(host, port, timeout=10)
    ftp.login("robot", "secret")
    body = f"reading {i}\n".encode() * 50
    ftp.storbinary(f"STOR reading{i}.txt", io.BytesIO(body))
    back = io.BytesIO()
    ftp.retrbinary(f"RETR reading{i}.txt", back.write)
    assert back.getvalue() == body, (i, back.getvalue()[:40])
    ftp.quit()
print(f"ftp: {count} ok")
