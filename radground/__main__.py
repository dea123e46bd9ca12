from radground.cli import main

main()
