from failoverd.ctl.commands import main

main()
