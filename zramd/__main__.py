from zramd.cli import main

main()
