from videoqa.cli import main

main()
