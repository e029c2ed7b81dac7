from mtnlg.cli import run

run()
